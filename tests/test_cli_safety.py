"""Nothing a user made is lost or polluted, and every check comes before the work: a new run never
replaces a finished one, a refused run leaves nothing behind, a step too big for the machine is
refused before it starts, outputs never land in the repository's tracked folders, a typo in an
option is an error, and files that are not what a command wants say what they are."""
import dataclasses
import os
import re
import shutil

import pytest

import config
import sample
import train


@pytest.fixture
def finished_run(tmp_path):
    """A finished 2-step gp1d run in tmp_path/run, as `python train.py --problem gp1d` leaves it."""
    cfg = config.make_config("gp1d", steps=2, batch_size=2, eval_every=0, out_dir=str(tmp_path / "run"))
    train.train(cfg, progress=False)
    return tmp_path / "run" / "ckpt.pt"


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# -----------------------------------------------------------------------------
# train.py


def test_a_new_run_never_replaces_a_finished_one(cli, finished_run):
    before = finished_run.read_bytes()
    code, out, err = cli(train, "--problem", "gp1d", "--steps", 1, "--out-dir", finished_run.parent, "--no-progress")
    assert code == 2 and err.count("\n") == 1, err
    assert f"--resume {finished_run}" in err and "another --out-dir" in err and "--overwrite" in err
    assert finished_run.read_bytes() == before and files_under(finished_run.parent) == ["ckpt.pt"]
    code, out, err = cli(train, "--problem", "gp1d", "--steps", 1, "--batch-size", 2, "--eval-every", 0,
                         "--out-dir", finished_run.parent, "--overwrite", "--no-progress")
    assert code == 0, err
    assert train.load_checkpoint(str(finished_run))[0]["step"] == 1  # replaced, because it was asked for


def test_resuming_never_writes_over_another_runs_checkpoint(cli, finished_run, tmp_path):
    shutil.copytree(finished_run.parent, tmp_path / "other")
    other = (tmp_path / "other" / "ckpt.pt").read_bytes()
    code, _, err = cli(train, "--resume", finished_run, "--steps", 3, "--out-dir", tmp_path / "other", "--no-progress")
    assert code == 2 and "already holds a run's checkpoint" in err, err
    assert (tmp_path / "other" / "ckpt.pt").read_bytes() == other
    code, _, err = cli(train, "--resume", finished_run, "--steps", 3, "--no-progress")  # its own checkpoint: fine
    assert code == 0, err
    assert train.load_checkpoint(str(finished_run))[0]["step"] == 3


def test_a_refused_run_leaves_no_folder(cli, tmp_path):
    code, _, err = cli(train, "--problem", "scenes3d", "--model", "oracle", "--out-dir", tmp_path / "run",
                       "--no-progress")
    assert code == 2 and err.startswith("error: scenes3d has no oracle") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_cpu_step_too_big_for_the_machine_is_refused_before_anything(cli, capsys, monkeypatch, tmp_path):
    from toy_problems import scenes3d, scenes3d_eval
    small = dataclasses.replace(scenes3d.SETTINGS["scenes3d"], ch=8, feat=8, width=16, out_feat=4, n_samples=4,
                                n_importance=4, patch=6, cond_size=8)
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d-64", small)  # the GPU setting's name; a network quick to count
    precision = config.make_config("scenes3d-64", device="cpu").precision  # bf16 on a CPU with bf16 instructions
    count = scenes3d_eval.memory_per_sample("scenes3d-64", precision)
    monkeypatch.setattr(config, "available_memory", lambda: 2 * (count["weights"] + 4.5 * count["activations"]))
    code, _, err = cli(train, "--problem", "scenes3d-64", "--device", "cpu", "--out-dir", tmp_path / "run",
                       "--no-progress")  # its default batch, 32, does not fit
    assert code == 2 and err.count("\n") == 1, err
    assert re.fullmatch(r"error: a training step of scenes3d-64 at --batch-size 32 needs at least [\d.]+ GiB "
                        r"\([\d.]+ GiB per example\), and this machine has [\d.]+ GiB free: scenes3d-64 is a GPU "
                        r"setting .*; here pass --batch-size 4 or less\n", err), err
    assert not (tmp_path / "run").exists()
    config.check_memory(config.make_config("scenes3d-64", batch_size=4, device="cpu"))  # what it suggests fits
    assert capsys.readouterr().err == ""  # with room to spare: not even a warning
    code, out, _ = cli(train, "--help")
    assert code == 0 and "scenes3d-64 and scenes3d-128 are GPU settings" in " ".join(out.split())


def test_a_step_that_may_not_fit_is_warned_about_with_its_size(monkeypatch, capsys):
    from toy_problems import scenes3d_eval
    cfg = config.make_config("scenes3d", batch_size=8, device="cpu")
    count = scenes3d_eval.memory_per_sample("scenes3d", cfg.precision)
    need = count["weights"] + 8 * count["activations"]
    monkeypatch.setattr(config, "available_memory", lambda: 100 * need)
    config.check_memory(cfg)
    assert capsys.readouterr().err == ""  # plenty: not a word
    monkeypatch.setattr(config, "available_memory", lambda: 1.5 * need)
    config.check_memory(cfg)  # fits by the count, with little to spare: a warning that says how much
    err = capsys.readouterr().err
    assert err.startswith("warning: a training step of scenes3d at --batch-size 8 needs at least "
                          f"{need / 2 ** 30:.1f} GiB")
    assert "lower --batch-size" in err
    monkeypatch.setattr(config, "available_memory", lambda: need / 2)
    with pytest.raises(ValueError, match=r"this machine has .* GiB free: here pass --batch-size [1-3] or less$"):
        config.check_memory(cfg)


@pytest.mark.parametrize("script, typo", [(train, "--step"), (sample, "--n-sample")])
def test_an_abbreviated_option_is_an_error_not_a_guess(cli, tmp_path, script, typo):
    args = ["--problem", "gp1d", "--out-dir", tmp_path / "run"] if script is train else [tmp_path / "ckpt.pt"]
    code, _, err = cli(script, *args, typo, 5)
    assert code == 2 and f"unrecognized arguments: {typo} 5" in err, err
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# sample.py


def test_a_checkpoint_outside_a_run_folder_writes_its_figure_under_out(cli, monkeypatch, finished_run, tmp_path):
    tracked = tmp_path / "notebooks"  # like notebooks/, which git tracks
    tracked.mkdir()
    shutil.copy(finished_run, tracked / "gp1d-dfm.pt")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(sample, tracked / "gp1d-dfm.pt", "--n-contexts", 2, "--n-samples", 2, "--steps", 2)
    assert code == 0, err
    assert files_under(tracked) == ["gp1d-dfm.pt"]  # nothing new beside it
    figure = os.path.join("out", "samples", "gp1d-dfm.png")
    assert out.endswith(f"figure: {figure}\n") and (tmp_path / figure).exists()
    code, out, err = cli(sample, finished_run, "--n-contexts", 2, "--n-samples", 2, "--steps", 2)
    assert code == 0 and out.endswith(f"figure: {finished_run.parent / 'samples.png'}\n")  # a run's: beside it


def test_a_figure_without_extension_is_saved_and_reported_as_png(cli, finished_run, tmp_path):
    code, out, err = cli(sample, finished_run, "--n-contexts", 2, "--n-samples", 2, "--steps", 2,
                         "--figure", tmp_path / "name")
    assert code == 0, err
    assert out.endswith(f"figure: {tmp_path / 'name.png'}\n") and (tmp_path / "name.png").exists()
    assert not (tmp_path / "name").exists()


def test_compare_names_what_it_is_for(cli, tmp_path):
    cfg = config.make_config("flatland", steps=1, batch_size=2, eval_every=0, out_dir=str(tmp_path))
    train.train(cfg, progress=False)
    code, _, err = cli(sample, tmp_path / "ckpt.pt", "--compare", tmp_path / "ckpt.pt")
    assert code == 2 and err.count("\n") == 1, err
    assert "--compare is for the 3D problems" in err and "3D problem (flatland)" not in err


def test_a_truncated_checkpoint_and_a_folder_say_what_they_are(cli, finished_run, tmp_path):
    (tmp_path / "cut.pt").write_bytes(finished_run.read_bytes()[:len(finished_run.read_bytes()) // 2])  # head -c
    for script, args in ((sample, []), (train, ["--resume"])):
        code, _, err = cli(script, *args, tmp_path / "cut.pt")
        assert code == 2 and "damaged or truncated" in err and err.count("\n") == 1, err
        code, _, err = cli(script, *args, finished_run.parent)
        assert code == 2 and err == (f"error: {str(finished_run.parent)!r} is a folder; "
                                     f"pass the checkpoint file in it: {finished_run}\n"), err
