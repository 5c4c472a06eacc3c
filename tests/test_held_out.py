"""Held-out scenes by construction, and far-side targets chosen from the cameras alone: posed_images/meshes.py builds
training and test sets from separate random streams and says so in the set, the scores refuse scenes a model may
have trained on, train.py refuses a test set, and the data path draws most targets of a set with a context frame
on its far side, whatever the images show."""
import os

import pytest
import torch

import toy_problems
from posed_images import dataset, formats, mesh_files, mesh_scores, meshes, problem, writers
from test_meshes import CUBE_FACES, CUBE_VERTICES
from test_scenes3d import TINY, tiny_model
from toy_problems import scenes3d

CUBE = {"cube": (CUBE_VERTICES, CUBE_FACES)}


@pytest.fixture
def sets(tmp_path):
    """A training set and a test set of the cube, built with the same seed: (train path, test path)."""
    paths = str(tmp_path / "train"), str(tmp_path / "test")
    for path, split in zip(paths, ("train", "test")):
        meshes.build(path, n_scenes=2, n_views=3, size=8, seed=0, meshes=CUBE, progress=False, split=split)
    return paths


def context_camera(path):
    """c2w (4, 4) of the context camera of a set's first scene, as the loader reads it."""
    return torch.as_tensor(formats.read_blender(os.path.join(path, "scene_000", "transforms_train.json"))["c2w"][0])


def test_train_and_test_sets_come_from_separate_streams_and_record_how_they_were_built(sets):
    train, test = sets
    for path, split, stream in ((train, "train", "dataset"), (test, "test", "held_out")):
        root, manifest = meshes.read_manifest(os.path.join(path, "scene_001", "train"))  # found from inside it
        assert root == os.path.abspath(path)
        assert {k: manifest[k] for k in ("split", "stream", "seed", "scenes", "views", "size", "meshes")} == \
            dict(split=split, stream=stream, seed=0, scenes=2, views=3, size=8, meshes=["cube"])
        # the scenes are the draws of the split's stream (toy_problems): a test scene is never a training scene
        generator = {"dataset": toy_problems.dataset_generator, "held_out": toy_problems.held_out_generator}[stream](0)
        scene = meshes.draw_scene(CUBE_VERTICES, 3, generator)
        c2w, _ = meshes.camera(*scene["views"][0], 8)
        assert torch.allclose(context_camera(path).float(), c2w, atol=1e-5)
    assert not torch.allclose(context_camera(train), context_camera(test), atol=1e-3)
    above = os.path.dirname(train)
    with open(os.path.join(above, "dataset.json"), "w") as f:
        f.write('{"split": "test"}')  # someone else's dataset.json, say
    assert meshes.read_manifest(above) is None  # above the sets: no set of build()'s


def test_scores_refuse_a_training_set_the_models_own_set_and_a_set_that_records_no_split(sets, tmp_path):
    train, test = sets
    model = tiny_model()  # every refusal comes before any sampling
    build_test = f"build a test set with: python -m posed_images.meshes --out {train}-test --split test --size 32$"
    os.symlink(test, tmp_path / "link")
    cases = [(train, "", f"^{train}: a training set \\({train}/dataset.json says split train\\), never held out; "
                        f"{build_test}"),
             (train, train, f"^{train}: the model was trained on {train}, which is or overlaps this set; score it "
                            "on a test set, built with: python -m posed_images.meshes --out "
                            f"{train}-test --split test"),
             (test, os.path.join(test, "scene_001"), f"^{test}: the model was trained on {test}/scene_001, which"),
             (test, str(tmp_path / "link"), f"^{test}: the model was trained on {tmp_path / 'link'}, which"),
             (str(tmp_path / "link"), os.path.dirname(test), "the model was trained on")]
    for data, trained_on, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            mesh_scores.hidden_scores(model, data, trained_on, n_scenes=1, n_samples=2, steps=1)
        assert "\n" not in str(error.value)
    os.remove(os.path.join(train, meshes.MANIFEST))  # as a set built before --split
    with pytest.raises(ValueError, match=f"^{train}: no dataset.json says which random stream built it .*; "
                                         f"{build_test}"):
        mesh_scores.hidden_scores(model, train, "", n_scenes=1, n_samples=2, steps=1)
    with pytest.raises(ValueError, match="at 8x8, the model renders 32x32"):  # a test set, trained elsewhere: scored
        mesh_scores.hidden_scores(model, test, train, n_scenes=1, n_samples=2, steps=1)


def test_train_py_refuses_a_test_set_before_writing_anything(sets, tmp_path, monkeypatch, capsys):
    import train
    monkeypatch.setattr(dataset, "DEFAULT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", TINY)
    monkeypatch.setattr("sys.argv", ["train.py", "--problem", "scenes3d", "--data", sets[1], "--format", "blender",
                                     "--steps", "1", "--batch-size", "1", "--workers", "0",
                                     "--out-dir", str(tmp_path / "run"), "--no-progress"])
    with pytest.raises(SystemExit) as exit:
        train.main()
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{sets[1]}: a test set (its dataset.json says split test), held out for scoring" in err
    assert not (tmp_path / "run").exists()
    train_batches = problem.make_problem("scenes3d", sets[0], "blender", progress=False).loader(1, 0, 0, range(1))
    assert next(train_batches)["trgt_obs"].shape == (1, 3, 32, 32)  # a training set trains


def test_meshes_py_builds_a_test_set_and_says_how_to_score_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mesh_files, "fetch_meshes", lambda names: CUBE)
    argv = ["meshes.py", "--scenes", "1", "--views", "2", "--size", "8", "--no-progress", "--split", "test"]
    monkeypatch.setattr("sys.argv", argv + ["--out", str(tmp_path / "set"), "--seed", str(2 ** 30)])
    with pytest.raises(SystemExit) as exit:
        meshes.main()
    assert exit.value.code == 2 and capsys.readouterr().err == "error: --seed must be in [0, 2^30), got 1073741824\n"
    monkeypatch.setattr("sys.argv", argv + ["--out", str(tmp_path / "set")])
    meshes.main()
    assert capsys.readouterr().out == f"1 test scenes in {tmp_path / 'set'}; score a model trained on a training " \
                                      f"set with: python sample.py CKPT --meshes {tmp_path / 'set'}\n"
    assert meshes.read_manifest(str(tmp_path / "set"))[1]["command"].endswith("--seed 0 --split test")


# -----------------------------------------------------------------------------
# Far-side targets


def ring_set(path, images, offset=0.0):
    """A NeRF-synthetic sequence of 12 cameras on a level ring looking at the origin, frame 0 (azimuth offset) the
    context and the others at offset + 15 + 30 k degrees: 6 of those 11 lie more than 90 degrees round from it."""
    azimuths = [offset] + [offset + 15 + 30 * k for k in range(11)]
    c2w, K = zip(*(meshes.camera(az, 0.0, 8) for az in azimuths))
    writers.write_blender(os.path.join(path, "transforms_train.json"), torch.stack(c2w), torch.stack(K), images,
                          context_frame=0)


def test_far_frames_are_those_looking_from_beyond_90_degrees(tmp_path):
    ring_set(str(tmp_path / "ring"), torch.zeros(12, 3, 8, 8))
    seq = dataset.find_sequences(str(tmp_path / "ring"), "blender", progress=False)[0]
    far = [15 + 30 * k > 90 and 15 + 30 * k < 270 for k in range(11)]
    assert dataset.far_frames(seq).tolist() == [False] + far
    assert dataset.far_frames({**seq, "context": None}) is None  # a random context has no far side


def test_far_targets_are_chosen_from_the_cameras_never_the_images(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "DEFAULT_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    for name in ("noise", "other-noise"):  # the same cameras, every image a different draw of noise
        for k, offset in enumerate((0.0, 100.0)):
            ring_set(str(tmp_path / name / f"seq{k}"), torch.rand(12, 3, 8, 8, generator=g) * 2 - 1, offset)
    batches = [dataset.SceneSet(str(tmp_path / name), "blender", 8, patch=4, progress=False).sample_batch(
        64, torch.Generator().manual_seed(1)) for name in ("noise", "other-noise")]
    assert not torch.equal(batches[0]["trgt_obs"], batches[1]["trgt_obs"])  # other images ...
    assert torch.equal(batches[0]["frames"], batches[1]["frames"])  # ... the same frames
    assert torch.equal(batches[0]["sequence"], batches[1]["sequence"]) and (batches[0]["frames"][:, 0] == 0).all()
    far = [15 + 30 * k > 90 and 15 + 30 * k < 270 for k in range(11)]
    assert sum(far[f - 1] for f in batches[0]["frames"][:, 1].tolist()) / 64 > 0.7  # mostly far: 0.86 expected


@pytest.mark.parametrize("share", [0.0, scenes3d.FAR_TARGETS, 1.0])
def test_the_share_of_far_targets_is_the_one_asked_for(share):
    data = dataset.SceneSet.__new__(dataset.SceneSet)
    data.frame_window, data.far_targets = 0, share
    far = torch.tensor([False] + [15 + 30 * k > 90 and 15 + 30 * k < 270 for k in range(11)])  # the ring's
    g = torch.Generator().manual_seed(0)
    picks = torch.tensor([data.pick_frames(12, g, context=0, far=far) for _ in range(4000)])  # (4000, 3)
    expected = share + (1 - share) * 6 / 11  # drawn among the far frames, or else among all 11
    assert abs(far[picks[:, 1]].float().mean().item() - expected) < 0.03
    assert (picks[:, 1:] != 0).all() and (picks[:, 1] != picks[:, 2]).all()
    assert abs(far[picks[:, 2]].float().mean().item() - 6 / 11) < 0.06  # the novel frame: any other, near uniform
    again = torch.Generator().manual_seed(0)
    assert [list(data.pick_frames(12, again, context=0, far=far)) for _ in range(5)] == picks[:5].tolist()


def tiny_run_and_mesh_sets(tmp_path, monkeypatch):
    """A one-step tiny scenes3d checkpoint, and a training and a test set of cube scenes beside it."""
    import config
    import train
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", TINY)
    train.train(config.make_config("scenes3d", steps=1, batch_size=1, eval_every=0, out_dir=str(tmp_path / "run")),
                progress=False)
    for split in ("train", "test"):
        meshes.build(str(tmp_path / split), n_scenes=2, n_views=3, size=TINY.world.size, seed=0, meshes=CUBE,
                     progress=False, split=split)
    return tmp_path / "run" / "ckpt.pt"


def test_sample_py_scores_a_checkpoint_on_a_test_set_and_refuses_a_training_set(tmp_path, monkeypatch, cli):
    import sample
    ckpt = tiny_run_and_mesh_sets(tmp_path, monkeypatch)
    code, out, err = cli(sample, ckpt, "--meshes", tmp_path / "test", "--n-samples", "2", "--steps", "1")
    assert code == 0 and "hidden_tv_floor" in out and "consistent" in out, err
    assert out.splitlines()[-1].split() == ["meshes", "cube", "(not", "in", "training)"]  # a toy model saw no mesh
    code, out, err = cli(sample, ckpt, "--meshes", tmp_path / "train", "--n-samples", "2", "--steps", "1")
    assert code == 2 and out == "" and err.count("\n") == 1 and "a training set" in err, err


def test_diagnose3d_checks_a_model_on_a_mesh_test_set_and_refuses_a_training_set(tmp_path, monkeypatch, cli):
    from experiments import diagnose3d
    ckpt = tiny_run_and_mesh_sets(tmp_path, monkeypatch)
    code, out, err = cli(diagnose3d, ckpt, "--meshes", tmp_path / "test", "--n-samples", "4", "--steps", "2")
    assert code == 0 and "1. sampler" in out and "2. reading" in out and "3. along" in out, err
    # the reading table: a header and a row per t; the trajectory's: a header, the first and last steps, the samples
    assert out.count("\n   ") == 1 + len(diagnose3d.T_READ) + 4
    code, out, err = cli(diagnose3d, ckpt, "--meshes", tmp_path / "train")
    assert code == 2 and out == "" and err.count("\n") == 1 and "a training set" in err, err
    # the exact denoiser's samples commit (every one sharp) and differ (not all one colour: tv 0.75)
    batch, renders, keep, hidden, seen = diagnose3d.mesh_truth(str(tmp_path / "test"), "", TINY.world.size, 2)
    assert renders.shape[:2] == (2, 4) and keep.shape == (2, 1, TINY.world.size, TINY.world.size)
    scores = diagnose3d.check_sampler_meshes(batch, renders, keep, 1000, 8, 20, torch.Generator().manual_seed(0))
    assert scores["sharp"] == 1 and scores["tv"] < 0.6
    # one colour share: a render in one palette colour is all one colour; half in another colour is half
    assert torch.allclose(diagnose3d.one_colour_share(renders[:, 1], keep, renders), torch.ones(2))
    rows = keep[:, 0].float().cumsum(-2).cumsum(-1)  # (B, S, S): split each hidden part by a diagonal line
    first = (keep[:, 0] & (rows <= rows.amax((1, 2), keepdim=True) / 4))[:, None]  # (B, 1, S, S) part of it
    mixed = torch.where(first, renders[:, 2], renders[:, 3])
    share = diagnose3d.one_colour_share(mixed, keep, renders)
    n_first, n_all = first.sum((1, 2, 3)).float(), keep.sum((1, 2, 3)).float()
    assert torch.allclose(share, torch.maximum(n_first, n_all - n_first) / n_all) and (share < 1).all()


def test_mesh_bench_scores_every_checkpoint_on_every_test_set_and_refuses_what_it_cannot_score(tmp_path, monkeypatch,
                                                                                                cli):
    import config
    import train
    from experiments import mesh_bench, tables
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", TINY)
    for split in ("train", "test"):
        meshes.build(str(tmp_path / split), n_scenes=2, n_views=3, size=TINY.world.size, seed=0, meshes=CUBE,
                     progress=False, split=split)
    ckpts = []
    for kind in ("dfm", "deterministic"):
        train.train(config.make_config("scenes3d", model=kind, steps=1, batch_size=1, eval_every=0,
                                       data=str(tmp_path / "train"), format="blender", out_dir=str(tmp_path / kind)),
                    progress=False)
        ckpts.append(tmp_path / kind / "ckpt.pt")
    toy = tiny_run_and_mesh_sets(tmp_path / "toy", monkeypatch)  # trained on the toy's scenes, not a mesh set
    small = ["--n-scenes", "2", "--n-samples", "2", "--steps", "1"]
    for args, says in (([toy, "--test", tmp_path / "test"], "trained on the toy's scenes"),
                       ([*ckpts, "--test", tmp_path / "train"], "the model was trained on"),
                       ([*ckpts, "--test", tmp_path / "nowhere"], "no such folder"),
                       ([*ckpts, "--test", tmp_path / "test", "--name", "../x"], "--name must be")):
        code, out, err = cli(mesh_bench, *args, *small, "--results", tmp_path / "refused")
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "refused").exists()  # refused before any work
    code, out, err = cli(mesh_bench, *ckpts, "--test", tmp_path / "test", *small, "--results", tmp_path / "res",
                         "--figures", tmp_path / "fig")
    assert code == 0, err
    results = tables.load_results(str(tmp_path / "res" / "meshes.json"))
    assert [r["model"] for r in results["rows"]] == ["dfm", "deterministic"]
    assert all(r["trained_on"] == "2 scenes of 1 meshes" and r["unseen"] == [] for r in results["rows"])
    assert tables.any_table(results) in out and "| dfm | 2 scenes of 1 meshes | 1 x 1 | test |" in out
    assert sorted(os.listdir(tmp_path / "fig")) == ["meshes-orbit.gif", "meshes-samples.png"]
    code, out, err = cli(mesh_bench, ckpts[0], "--test", tmp_path / "test", *small, "--results", tmp_path / "res",
                         "--name", "meshes-sweep")
    assert code == 0 and sorted(os.listdir(tmp_path / "res")) == ["meshes-sweep.json", "meshes.json"], err
    assert tables.load_results(str(tmp_path / "res" / "meshes.json")) == results  # the other file left as it was
