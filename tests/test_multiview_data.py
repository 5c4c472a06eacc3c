"""Training on posed images from disk: batches like scenes3d's from a written data set, scaled and
bounded per format, cached, made ahead by DataLoader workers, and a short training run that learns."""
import math

import numpy as np
import pytest
import torch

import config
from posed_images import dataset, problem as posed, writers
import render
import toy_problems
import train
from test_multiview import known_scene, render_known
from test_scenes3d import TINY
from toy_problems import scenes3d, scenes3d_world as world_lib

H, W = 40, 56  # written non-square; loaded at TINY's 32 x 32


def ring(n, offset=0.0):
    """n cameras of the toy's ring (2.8 from the point they look at), square pixels, centred principal point."""
    c2w = world_lib.cameras(torch.arange(n) * 2 * math.pi / n + offset)["c2w"]
    f = 0.8 * W
    K = torch.tensor([[f / W, 0.0, 0.5], [0.0, f / H, 0.5], [0.0, 0.0, 1.0]]).expand(n, 3, 3).clone()
    return c2w, K


@pytest.fixture
def co3d_set(tmp_path, monkeypatch):
    """Three sequences of eight frames of the known scene, as CO3D; the cache and the setting made small."""
    cameras = {}
    for k in range(3):
        c2w, K = ring(8, offset=k)
        writers.write_co3d(str(tmp_path / "co3d"), "spheres", f"seq{k}", c2w, K, render_known(c2w, K, H, W)[0])
        cameras[f"seq{k}"] = c2w
    monkeypatch.setattr(dataset, "DEFAULT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", TINY)
    return str(tmp_path / "co3d"), cameras


def test_batches_are_posed_relative_to_the_context_scaled_and_reproduce_the_frames(co3d_set):
    path, cameras = co3d_set
    data = dataset.SceneSet(path, "co3d", 32, workers=0, progress=False)
    b = data.sample_batch(4, torch.Generator().manual_seed(0))
    assert b["ctxt_obs"].shape == (4, 1, 3, 32, 32) and b["trgt_obs"].shape == b["novel_obs"].shape == (4, 3, 32, 32)
    assert torch.allclose(b["ctxt_params"]["c2w"][:, 0], torch.eye(4).expand(4, 4, 4), atol=1e-5)
    scale = 10 / 2.8  # every ring camera looks at its target from 2.8: CO3D's mean depth becomes 10
    for i, (seq, frames) in enumerate(zip(b["sequence"].tolist(), b["frames"].tolist())):
        world = cameras[data.sequences[seq]["name"]]
        for view, (obs, params) in enumerate([(b["ctxt_obs"][i, 0], {k: v[i, 0] for k, v in b["ctxt_params"].items()}),
                                              (b["trgt_obs"][i], {k: v[i] for k, v in b["trgt_params"].items()}),
                                              (b["novel_obs"][i], {k: v[i] for k, v in b["novel_params"].items()})]):
            unscaled = params["c2w"].clone()
            unscaled[:3, 3] /= scale
            # relative to the context
            assert torch.allclose(world[frames[0]] @ unscaled, world[frames[view]], atol=1e-4)
            looked_at = render.project(torch.tensor([[0.0, 0.0, 10.0]]), params["c2w"], params["K"])[0]
            assert torch.allclose(looked_at, torch.tensor([[0.5, 0.5]]), atol=1e-4)  # the target, at depth 10
            rendered, _ = render_known(world[frames[view]][None], params["K"][None], 32, 32)
            assert (rendered[0] - obs).abs().mean() < 0.05  # the frame, cropped and resized with its K


def test_co3d_scenes_lie_inside_the_authors_bounds_and_rays_stop_at_them(co3d_set):
    path, _ = co3d_set
    near, far = dataset.FORMATS["co3d"].near, dataset.FORMATS["co3d"].far
    assert (near, far) == (0.5, 40.0) and dataset.FORMATS["re10k"].near == 0.7
    data = dataset.SceneSet(path, "co3d", 32, workers=0, progress=False)
    b = data.sample_batch(8, torch.Generator().manual_seed(1))
    for i, (seq, frames) in enumerate(zip(b["sequence"].tolist(), b["frames"].tolist())):
        w2c0 = torch.linalg.inv(torch.as_tensor(data.sequences[seq]["c2w"][frames[0]])).float()
        centres = (known_scene()["center"][0] @ w2c0[:3, :3].T + w2c0[:3, 3]) * 10 / 2.8  # (M, 3) context frame, scaled
        context = {k: v[i, 0] for k, v in b["ctxt_params"].items()}
        for params in (context, {k: v[i] for k, v in b["trgt_params"].items()}):
            depth = render.project(centres, params["c2w"], params["K"])[1]
            assert (depth > near).all() and (depth < far).all()
    # rays start at near and stop at far: a wall of fog closer than near or beyond far is never seen
    setting = posed.setting_for("scenes3d", "co3d")
    for lo, hi, seen in ((0.1, 0.45, False), (5.0, 6.0, True), (41.0, 60.0, False)):
        def fog(views, points):  # (B, P, 3) -> opaque white between lo and hi from the origin
            r = points.norm(dim=-1)
            sigma = 100.0 * ((r > lo) & (r < hi)).float()
            return sigma, torch.ones(*r.shape, 3), torch.zeros(*r.shape, setting.out_feat)
        signal = scenes3d.Signal(fog, None, setting)
        params = {"c2w": torch.eye(4)[None], "K": torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]])[None]}
        with torch.no_grad():
            obs = scenes3d.render_pixels(signal, params, uv=torch.tensor([[[0.5, 0.5]]]))["obs"]
        assert (obs.mean() > 0.9) == seen, (lo, hi)


def test_frames_come_from_the_window_around_the_context(tmp_path):
    data = dataset.SceneSet.__new__(dataset.SceneSet)
    generator = torch.Generator().manual_seed(0)
    for window in (1, 3):
        data.frame_window = window
        picks = torch.tensor([data.pick_frames(20, generator) for _ in range(300)])  # (300, 3)
        gaps = (picks[:, 1:] - picks[:, :1]).abs()
        assert (gaps >= 1).all() and (gaps <= window).all() and gaps.max() == window
        assert set(picks[:, 0].tolist()) == set(range(20))  # every frame can be the context
    data.frame_window = 0  # any frame
    picks = torch.tensor([data.pick_frames(20, generator) for _ in range(300)])
    assert (picks[:, 1] != picks[:, 0]).all() and (picks[:, 1] != picks[:, 2]).all()
    assert (picks[:, 1:] - picks[:, :1]).abs().max() > 10
    assert {data.pick_frames(20, generator, context=0)[0] for _ in range(20)} == {0}  # a fixed context frame


def test_images_are_decoded_once_and_cached(co3d_set, monkeypatch):
    path, _ = co3d_set
    calls = []
    decode = dataset.load_frames
    monkeypatch.setattr(dataset, "load_frames", lambda *a, **k: calls.append(1) or decode(*a, **k))
    first = dataset.SceneSet(path, "co3d", 32, workers=0, progress=False)
    assert len(calls) == 3  # one per sequence
    again = dataset.SceneSet(path, "co3d", 32, workers=0, progress=False)
    assert len(calls) == 3  # read from the cache
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(first.sample_batch(3, g())["trgt_obs"], again.sample_batch(3, g())["trgt_obs"])
    dataset.SceneSet(path, "co3d", 16, workers=0, progress=False)
    assert len(calls) == 6  # another size is another cache


def test_dataloader_workers_make_the_batches_the_training_steps_would_draw(co3d_set):
    path, _ = co3d_set
    problem = posed.make_problem("scenes3d", path, "co3d", frame_window=2, workers=1, progress=False)
    made_ahead = list(problem.loader(2, 7, 0, range(3, 5)))
    for step, batch in zip((3, 4), made_ahead):
        direct = problem.sample_batch(2, toy_problems.train_generator(7, step, 0))
        assert all(torch.equal(batch[k], direct[k]) for k in ("trgt_obs", "pixels", "frames"))


def test_a_short_quiet_training_run_on_a_written_data_set_lowers_the_loss(co3d_set, tmp_path, monkeypatch, capsys):
    path, _ = co3d_set
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["train.py", "--problem", "scenes3d", "--data", path, "--format", "co3d",
                                     "--frame-window", "3", "--steps", "30", "--batch-size", "4", "--lr", "2e-3",
                                     "--warmup", "1", "--workers", "1", "--out-dir", str(out), "--no-progress"])
    train.main()
    err = capsys.readouterr().err
    assert "indexing" not in err and "caching" not in err and "it/s" not in err  # --no-progress: no bar at all
    ckpt, cfg = train.load_checkpoint(str(out / "ckpt.pt"))
    assert (cfg.data, cfg.format, cfg.frame_window) == (path, "co3d", 3)
    monkeypatch.setattr(dataset, "DEFAULT_CACHE", str(tmp_path / "another-cache"))
    batch = train.load_problem(cfg).held_out_batch(8)  # the bars are on by default
    err = capsys.readouterr().err
    assert "indexing" in err and "caching images" in err

    def loss(state):
        torch.manual_seed(0)
        model = train.build_model(cfg)
        if state is not None:
            model.load_state_dict(state)
        losses = []
        for seed in range(4):  # the same timesteps and noise for both
            torch.manual_seed(seed)
            losses.append(model(batch).item())
        return sum(losses) / len(losses)

    assert loss(ckpt["model"]) < 0.75 * loss(None)


def test_data_options_are_checked_before_any_work(tmp_path):
    for options, message in [(dict(data=str(tmp_path)), "--format must be one of re10k, co3d, blender"),
                             (dict(data=str(tmp_path / "nowhere"), format="co3d"), "--data must be an existing"),
                             (dict(format="co3d"), "--format must be"),
                             (dict(frame_window=3), "--frame-window must be"),
                             (dict(data=str(tmp_path), format="co3d", workers=-1), "--workers must be")]:
        with pytest.raises(ValueError, match=message):
            config.make_config("scenes3d", **options).validate()
    with pytest.raises(ValueError, match="--data must be"):
        config.make_config("flatland", data=str(tmp_path), format="co3d").validate()
    with pytest.raises(FileNotFoundError, match="no frame_annotations.jgz"):
        dataset.SceneSet(str(tmp_path), "co3d", 32, progress=False)


def test_sample_py_samples_scenes_from_ones_own_image_and_scores_a_data_checkpoint(co3d_set, tmp_path, monkeypatch):
    from toy_problems import metrics
    import sample
    from PIL import Image
    monkeypatch.setattr(metrics, "load_lpips", lambda: (None, "LPIPS unavailable: not fetched in tests"))
    path, _ = co3d_set  # and tiny networks (TINY): quick on a CPU
    for name, extra in (("data", dict(data=path, format="co3d", workers=0)), ("toy", {})):
        cfg = config.make_config("scenes3d", steps=1, batch_size=2, out_dir=str(tmp_path / name), **extra)
        train.train(cfg, progress=False)
    photo = tmp_path / "my.jpg"
    Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(photo)  # not square, a JPEG
    for name in ("data", "toy"):  # the data model puts the camera at the origin; the toy at its context camera
        monkeypatch.setattr("sys.argv", ["sample.py", str(tmp_path / name / "ckpt.pt"), "--image", str(photo),
                                         "--fov", "60", "--n-samples", "2", "--steps", "2"])
        sample.main()
        assert (tmp_path / name / "samples.gif").stat().st_size > 0
    monkeypatch.setattr("sys.argv", ["sample.py", str(tmp_path / "data" / "ckpt.pt"), "--n-contexts", "2",
                                     "--n-samples", "2", "--steps", "2"])
    sample.main()  # a data checkpoint: scores at the context and target views, the figure and orbit GIFs
    assert (tmp_path / "data" / "samples.png").exists() and (tmp_path / "data" / "samples-0.gif").exists()


def test_sample_py_image_errors_are_one_line(tmp_path, monkeypatch, capsys, co3d_set):
    import re
    import sample
    cfg = config.make_config("scenes3d", steps=1, batch_size=1, out_dir=str(tmp_path / "toy"))
    train.train(cfg, progress=False)
    from PIL import Image
    garbage = tmp_path / "not-an-image.png"
    garbage.write_text("hello")
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((2, 600, 3), np.uint8)).save(thin)
    for image, extra, message in [(garbage, [], "--image needs a checkpoint of a 3D problem .* and --fov"),
                                  (garbage, ["--fov", "200"], r"--fov must be in \(0, 180\)"),
                                  (garbage, ["--fov", "50"], "not-an-image.png: not an image PIL can read"),
                                  (thin, ["--fov", "50"], r"thin.png: the image is 600x2 \(WxH\); this model needs "
                                                          "at least 32 pixels on its shorter side")]:
        argv = ["sample.py", str(tmp_path / "toy" / "ckpt.pt"), "--image", str(image)] + extra
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exit:
            sample.main()
        err = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
