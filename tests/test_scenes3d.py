"""The 3D problem's model at a tiny size: rendering patches, training steps of both scales, scores, pictures."""
import dataclasses
import math

import pytest
import torch

import dfm
from toy_problems import metrics
import toy_problems
import config
import train
from toy_problems import scenes3d, scenes3d_eval, scenes3d_networks, scenes3d_world

TINY = dataclasses.replace(scenes3d.SETTINGS["scenes3d"], ch=8, feat=8, width=16, out_feat=4, n_samples=4,
                           n_importance=4, patch=6, cond_size=8)


def tiny_model(kind="dfm", setting=TINY):
    torch.manual_seed(0)
    return dfm.make_model(kind, scenes3d_networks.make_denoiser(kind, setting), scenes3d.forward,
                          obs_loss=lambda p, t: scenes3d.obs_loss(p, t, setting))


def test_a_patch_renders_exactly_the_pixels_of_the_whole_image():
    model = tiny_model().eval()
    b = scenes3d.sample_batch(2, torch.Generator().manual_seed(0), setting=TINY)
    t = torch.tensor([10, 500])
    with torch.no_grad():  # without gradients the samples along rays are not jittered: deterministic
        signal = model.denoiser(b["ctxt_obs"], b["ctxt_params"], b["trgt_obs"], b["trgt_params"], t)
        whole = scenes3d.forward(signal, b["trgt_params"])  # (B, 3, H, W)
        patch, depth = scenes3d.forward(signal, b["trgt_params"], pixels=b["pixels"])  # (B, 3, P), (B, P)
        depth_map = scenes3d.render_pixels(signal, b["trgt_params"])["depth"]  # (B, H*W)
    assert whole.shape == (2, 3, 32, 32) and patch.shape == (2, 3, TINY.patch ** 2)
    assert torch.allclose(patch, dfm.select_pixels(whole, b["pixels"]), atol=1e-5)
    assert torch.allclose(depth, depth_map.gather(1, b["pixels"]), atol=1e-5)  # the patch's depth comes with it
    rows, cols = b["pixels"][0] // 32, b["pixels"][0] % 32  # a square patch, row by row
    assert (rows.view(6, 6).diff(dim=0) == 1).all() and (cols.view(6, 6).diff(dim=1) == 1).all()


def test_training_views_favour_the_hidden_half_by_geometry_alone():
    """Far-side target cameras and patches centred on the sphere: chosen from where things are,
    never from their colours, so the objective's optimum (the posterior) does not move."""
    b = scenes3d.sample_batch(400, torch.Generator().manual_seed(0))
    position = b["trgt_params"]["c2w"][:, :3, 3]  # (B, 3) the camera centres
    relative = (torch.atan2(position[:, 1], position[:, 0]) - scenes3d_world.CONTEXT_AZIMUTH) % (2 * math.pi)
    far = ((relative > math.pi / 2) & (relative < 3 * math.pi / 2)).float().mean()
    assert abs(far - (scenes3d.FAR_TARGETS + (1 - scenes3d.FAR_TARGETS) / 2)) < 0.06  # 0.85: 0.7 plus half the rest
    uv, _ = scenes3d.render.project(b["scenes"]["center"], b["trgt_params"]["c2w"], b["trgt_params"]["K"])
    centre = (uv[:, 0].flip(-1) * 32).long().clamp(0, 31)  # (B, 2) row, column of the sphere's centre
    holds = (b["pixels"] == (centre[:, :1] * 32 + centre[:, 1:])).any(1).float().mean()
    assert holds > scenes3d.ON_SPHERE_PATCHES  # the centred ones, plus random ones that happen to hold it
    recoloured = scenes3d_world.with_back_colours(b["scenes"], (b["scenes"]["back"] + 1) % 4)
    assert torch.equal(scenes3d.patches(b["scenes"], b["trgt_params"], 32, 12, torch.Generator().manual_seed(1)),
                       scenes3d.patches(recoloured, b["trgt_params"], 32, 12, torch.Generator().manual_seed(1)))


def test_the_target_view_reaches_points_the_context_sees_only_through_the_front():
    """A back-half point projects into the context image onto the front pixel that hides it; the
    denoising field keeps the target's features apart from the contexts' mean, and the
    context-only field never sees a target at all."""
    model = tiny_model().eval()
    b = scenes3d.sample_batch(2, torch.Generator().manual_seed(0), setting=TINY)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        signal = model.denoiser(b["ctxt_obs"], b["ctxt_params"], b["trgt_obs"], b["trgt_params"], t)
        back = b["scenes"]["center"] - 0.9 * b["scenes"]["radius"][..., None] * b["scenes"]["normal"]  # (B, 1, 3)
        views = signal.views
        noise = torch.randn_like(views.feats[:, -1:])  # another target
        other = dataclasses.replace(views, feats=torch.cat([views.feats[:, :-1], noise], 1))
        assert not torch.allclose(signal.field(views, back)[1], signal.field(other, back)[1])
        assert isinstance(signal.field, scenes3d_networks.DenoisingField) and signal.field is model.denoiser.field
        contexts = views.map(lambda v: v[:, :-1])  # the context alone
        context_field = model.denoiser.context_field
        assert isinstance(context_field, scenes3d_networks.ContextField) and context_field is not signal.field
        assert torch.equal(context_field(contexts, back)[1], context_field(other.map(lambda v: v[:, :-1]), back)[1])


def test_the_shipped_weights_load_into_the_two_fields_key_for_key():
    import os
    for kind in ("dfm", "deterministic"):  # load_state_dict is strict: no key missing, none left over
        path = os.path.join(os.path.dirname(__file__), "..", "notebooks", f"scenes3d-{kind}.pt")
        model, _ = train.load_ema_model(path)
        assert isinstance(model.denoiser.field, scenes3d_networks.DenoisingField)
        assert isinstance(model.denoiser.context_field, scenes3d_networks.ContextField)


@pytest.mark.parametrize("kind,full_res", [("dfm", False), ("deterministic", False), ("dfm", True)])
def test_one_training_step_reaches_every_weight(kind, full_res):
    setting = dataclasses.replace(TINY, full_res=full_res)
    model = tiny_model(kind, setting)
    b = scenes3d.sample_batch(2, torch.Generator().manual_seed(0), setting=setting)
    loss = model(b)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_full_resolution_features_are_at_the_images_resolution_and_posed_images_use_them():
    from posed_images import problem as posed
    x = torch.randn(2, 3, 16, 16)
    half, full = scenes3d_networks.Encoder(3, 8, 5), scenes3d_networks.Encoder(3, 8, 5, full_res=True)
    assert half(x, torch.zeros(2, dtype=torch.long)).shape == (2, 5, 8, 8)
    assert full(x, torch.zeros(2, dtype=torch.long)).shape == (2, 5, 16, 16)
    assert not scenes3d.SETTINGS["scenes3d"].full_res  # the toy's shipped weights are half resolution
    assert posed.setting_for("scenes3d", "blender").full_res


def test_the_denoiser_adds_the_conditioning_loss_and_depth_smoothness():
    model = tiny_model()
    b = scenes3d.sample_batch(2, torch.Generator().manual_seed(0), setting=TINY)
    t = torch.tensor([3, 7])
    signal = model.denoiser(b["ctxt_obs"], b["ctxt_params"], b["trgt_obs"], b["trgt_params"], t)
    fields = signal.views.feats.shape  # the signal is left as the denoiser made it
    _, depth = scenes3d.forward(signal, b["trgt_params"], pixels=b["pixels"])  # the patch's depth comes back
    assert depth.shape == (2, TINY.patch ** 2) and signal.views.feats.shape == fields
    torch.manual_seed(0)
    aux = model.denoiser.aux_loss(signal, b["trgt_obs"], b["trgt_params"], b["pixels"], depth)
    aux.backward(retain_graph=True)
    assert aux > 0 and model.denoiser.ctxt_encoder.out.weight.grad.abs().sum() > 0  # through the context-only field
    torch.manual_seed(0)  # the same conditioning patch, without the depth: the smoothness term is what differs
    without = model.denoiser.aux_loss(signal, b["trgt_obs"], b["trgt_params"], b["pixels"], None)
    image = dfm.select_pixels(b["trgt_obs"], b["pixels"]).view(2, 3, TINY.patch, TINY.patch)
    smooth = scenes3d_networks.edge_aware_smoothness(depth.view(2, 1, TINY.patch, TINY.patch), image)
    assert torch.allclose(aux - without, TINY.depth_smooth * smooth)
    model.zero_grad()
    (aux - without).backward()
    assert model.denoiser.field.head.weight.grad.abs().sum() > 0  # the smoothness shapes the denoising field


def test_edge_aware_smoothness_is_zero_for_flat_depth_and_forgives_image_edges():
    flat, image = torch.full((1, 1, 4, 4), 2.0), torch.zeros(1, 3, 4, 4)
    assert scenes3d_networks.edge_aware_smoothness(flat, image) == 0
    step = flat.clone()
    step[..., 2:] = 4.0
    edge = image.clone()
    edge[..., 2:] = 2.0
    assert scenes3d_networks.edge_aware_smoothness(step, edge) < scenes3d_networks.edge_aware_smoothness(step, image)


def test_there_is_no_oracle_and_it_says_why():
    with pytest.raises(ValueError, match="no oracle"):
        scenes3d_networks.make_denoiser("oracle")


def test_lpips_joins_the_loss_on_patches_when_its_weights_load(monkeypatch):
    # The wiring only: a random trunk (metrics.random_lpips), never used for a reported number.
    monkeypatch.setattr(scenes3d, "lpips_or_none", lambda: metrics.random_lpips())
    setting = dataclasses.replace(TINY, lpips=0.5)
    pred = torch.rand(2, 3, 36, requires_grad=True)
    target = torch.rand(2, 3, 36)
    loss = scenes3d.obs_loss(pred, target, setting)
    assert loss > torch.nn.functional.mse_loss(pred, target)
    loss.backward()
    assert pred.grad.abs().sum() > 0
    monkeypatch.setattr(scenes3d, "lpips_or_none", lambda: None)  # unavailable: plain L2
    assert scenes3d.obs_loss(pred, target, setting) == torch.nn.functional.mse_loss(pred, target)


@pytest.mark.parametrize("name", ["scenes3d", "scenes3d-64"])
def test_both_scales_train_through_train_py_with_bf16(name, tmp_path, monkeypatch):
    """The GPU configuration (two spheres, LPIPS, bf16) runs unchanged at a tiny size on the CPU."""
    big = scenes3d.SETTINGS[name]
    shrunk = dataclasses.replace(TINY, world=dataclasses.replace(big.world, size=32), lpips=big.lpips)
    monkeypatch.setitem(scenes3d.SETTINGS, name, shrunk)
    monkeypatch.setattr(scenes3d, "lpips_or_none", lambda: metrics.random_lpips())  # wiring only
    cfg = config.make_config(name, steps=2, batch_size=2, precision="bf16", eval_every=0, out_dir=str(tmp_path))
    model, _ = train.train(cfg, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert train.load_checkpoint(str(tmp_path / "ckpt.pt"))[0]["step"] == 2


def test_sampling_gives_a_field_that_renders_from_any_camera():
    model = tiny_model()
    b = scenes3d.held_out_batch(2, setting=TINY)
    aimed = scenes3d_eval.opposite(b, TINY)
    signal = dfm.sample_signals(model, aimed, 2, torch.Generator().manual_seed(0), steps=2)
    with torch.no_grad():  # renders for looking at, not training: no jitter along the rays
        views = scenes3d_eval.render_at(signal, 90.0)
        assert views.shape == (4, 3, 32, 32) and views.abs().max() <= 1
        again = dfm.sample_signals(model, aimed, 2, torch.Generator().manual_seed(0), steps=2)
        assert torch.equal(scenes3d_eval.render_at(again, 90.0), views)  # seeded


def test_evaluate_plot_and_animate_run_and_the_scores_are_in_range(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "load_lpips", lambda: (None, "LPIPS unavailable: not fetched in tests"))
    model = tiny_model()
    scores = scenes3d_eval.evaluate(model, n_contexts=2, n_samples=2, steps=2, histogram_path=tmp_path / "hist.png")
    assert (tmp_path / "hist.png").stat().st_size > 0
    assert math.isnan(scores["lpips_context"])  # reported as unavailable, never made up
    assert 0 <= scores["back_tv"] <= 0.75 and 0 <= scores["sharp"] <= 1 and 0 <= scores["consistent"] <= 1
    assert scores["views"] > scores["views_floor"] >= 0  # an untrained model is far from the posterior
    assert math.isfinite(scores["psnr_context"]) and math.isfinite(scores["psnr_near"])
    scenes3d_eval.plot(model, tmp_path / "grid.png", n_contexts=1, n_samples=2, steps=2,
                       compare=tiny_model("deterministic"))
    scenes3d_eval.animate(model, tmp_path / "orbit.gif", n_samples=1, n_frames=2, steps=2)
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "orbit.gif").stat().st_size > 0


def test_memory_is_counted_from_what_autograd_saves(monkeypatch):
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", TINY)
    small = scenes3d_eval.memory_per_sample("scenes3d")
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", dataclasses.replace(TINY, patch=12))
    bigger_patch = scenes3d_eval.memory_per_sample("scenes3d")
    assert small["weights"] == bigger_patch["weights"] > 0
    assert bigger_patch["activations"] > 2 * small["activations"]  # 4x the patch pixels


def test_the_three_problem_names_share_one_module():
    problems = [toy_problems.load(n) for n in ("scenes3d", "scenes3d-64", "scenes3d-128")]
    assert {p.forward for p in problems} == {scenes3d.forward}
    assert [p.SETTING.world.size for p in problems] == [32, 64, 128]
    assert problems[0].SETTING.world.n_spheres == 1 and problems[1].SETTING.world.n_spheres == 2
    assert all(p.SETTING.box == scenes3d_world.SCENE_BOX and p.SETTING.near_far is None for p in problems)


def test_scenes3d_notebook_runs_top_to_bottom(run_notebook):
    notebook = run_notebook("scenes3d.ipynb")
    bars = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []) if o.get("name") == "stderr")
    assert "sampling" in bars  # its long cells, which sample, show progress


def test_sample_py_writes_a_grid_and_an_orbit_per_context_with_the_comparison_model(tmp_path, monkeypatch):
    import sample
    monkeypatch.setattr(metrics, "load_lpips", lambda: (None, "LPIPS unavailable: not fetched in tests"))
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", TINY)
    for kind in ("dfm", "deterministic"):
        cfg = config.make_config("scenes3d", model=kind, steps=1, batch_size=1, out_dir=str(tmp_path / kind))
        train.train(cfg, progress=False)
    monkeypatch.setattr("sys.argv", ["sample.py", str(tmp_path / "dfm" / "ckpt.pt"), "--compare",
                                     str(tmp_path / "deterministic" / "ckpt.pt"), "--n-contexts", "1",
                                     "--n-samples", "2", "--steps", "2"])
    sample.main()
    assert (tmp_path / "dfm" / "samples.png").exists()
    assert (tmp_path / "dfm" / "samples-0.gif").exists()
    assert not (tmp_path / "dfm" / "samples-1.gif").exists()  # --n-contexts 1: one context, one orbit


def test_autoregressive_sampling_adds_each_sampled_view_to_the_context():
    model = tiny_model()
    b = scenes3d.held_out_batch(1, setting=TINY)
    targets = [scenes3d_eval.cameras_at(deg, 1, TINY, "cpu") for deg in (120.0, 240.0)]
    signal, views = model.sample_autoregressive(b["ctxt_obs"], b["ctxt_params"], targets, steps=2, generator=0)
    assert views.shape == (1, 2, 3, 32, 32)
    assert signal.views.feats.shape[1] == 3  # the last field: the context, the first sampled view, the target


@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun not on PATH")
def test_the_3d_problem_trains_under_torchrun(tmp_path):
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["torchrun", "--nproc_per_node=2", "train.py", "--problem", "scenes3d", "--steps", "1",
                          "--batch-size", "2", "--out-dir", str(tmp_path / "run"), "--no-progress", "--device", "cpu"],
                         cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert train.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))[0]["step"] == 1


def test_diagnose3d_checks_the_sampler_against_the_exact_denoiser_and_prints_every_number(tmp_path, monkeypatch,
                                                                                           capsys):
    from experiments import diagnose3d
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", TINY)
    train.train(config.make_config("scenes3d", steps=1, batch_size=1, out_dir=str(tmp_path)), progress=False)
    monkeypatch.setattr("sys.argv", ["experiments/diagnose3d.py", str(tmp_path / "ckpt.pt"), "--n-contexts", "2",
                                     "--n-samples", "4", "--steps", "2"])
    diagnose3d.main()
    out = capsys.readouterr().out
    # the reading table: a header and a row per t; the trajectory's: a header, the first and last steps, the samples
    assert all(f"{k}. " in out for k in range(1, 6)) and out.count("\n   ") == 1 + len(diagnose3d.T_READ) + 4
    # the exact denoiser's samples commit (every one sharp) and differ (not all one colour: tv 0.75)
    b = scenes3d.held_out_batch(4)
    far = scenes3d_eval.cameras_at(180.0, 4, TINY, "cpu")
    scores = diagnose3d.check_sampler(b, far, TINY.world, 1000, 8, 20, torch.Generator().manual_seed(0))
    assert scores["sharp"] == 1 and scores["tv"] < 0.6


@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun not on PATH")
def test_gpu_check_runs_tiny_on_the_cpu(monkeypatch, capsys):
    from experiments import gpu_check
    monkeypatch.setattr("sys.argv", ["experiments/gpu_check.py", "--problem", "scenes3d", "--device", "cpu",
                                     "--steps", "2", "--batch-size", "1"])
    gpu_check.main()
    out = capsys.readouterr().out
    assert "1. memory per example" in out and "counted" in out and "2. speed:" in out
    assert "3. one DDP step under torchrun --nproc_per_node=1 (gloo): ok" in out


def test_save_gif_plays_the_panels_in_step_beside_a_still(tmp_path):
    """One frame per frame of the panels; the still (a context image) is the same in every frame, the panels move."""
    import numpy as np
    from PIL import Image, ImageSequence
    frames = torch.linspace(-1, 1, 3)[:, None, None, None].expand(3, 3, 8, 8)  # (F, 3, H, W) dark to bright
    scenes3d_eval.save_gif([("moving", frames)], tmp_path / "a.gif", still=("still", torch.zeros(3, 8, 8)))
    gif = [torch.tensor(np.asarray(f.convert("L")), dtype=torch.float32)  # (H, W) grey levels of each frame
           for f in ImageSequence.Iterator(Image.open(tmp_path / "a.gif"))]
    assert len(gif) == 3
    W = gif[0].shape[1]
    left, right = [g[:, : W // 2] for g in gif], [g[:, W // 2:] for g in gif]
    assert all(torch.equal(left[0], x) for x in left[1:])  # the still
    assert right[0].mean() < right[1].mean() < right[2].mean()  # the panel brightens
