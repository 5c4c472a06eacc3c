"""The command lines as a careful user meets them: every bad input a one-line error naming the option,
resume that never touches another run, Ctrl-C that keeps a resumable checkpoint, help on every option.

Most tests call a script's main() in this process (fast); a few run real processes where the
process itself matters (exit status from the shell, Ctrl-C, torchrun)."""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

from experiments import bench
import sample
import config
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gp1d_ckpt(tmp_path_factory):
    """A 2-step gp1d checkpoint (at step 2 of 2), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("gp1d")
    train.train(config.make_config("gp1d", steps=2, batch_size=2, eval_every=0, out_dir=str(out)), progress=False)
    return out / "ckpt.pt"


def step_of(path):
    return torch.load(path, weights_only=True)["step"]


# -----------------------------------------------------------------------------
# train.py: bad options


@pytest.mark.parametrize("option, value, allowed", [
    ("--steps", -5, "an integer >= 1"), ("--steps", 0, "an integer >= 1"),
    ("--batch-size", 0, "an integer >= 1"), ("--batch-size", -4, "an integer >= 1"),
    ("--lr", 0, "a number > 0"), ("--lr", "nan", "a number > 0"), ("--warmup", -1, "an integer >= 0"),
    ("--ema-decay", 2, r"in \[0, 1\)"), ("--ema-decay", 1, r"in \[0, 1\)"), ("--grad-clip", 0, "a number > 0"),
    ("--timesteps", 0, "an integer >= 1"), ("--ctxt-drop-prob", 1, r"in \[0, 1\)"),
    ("--novel-weight", -1, "a number >= 0"), ("--lr-schedule", "step", "constant or cosine"),
    ("--precision", "fp16", "fp32, bf16 or auto"), ("--ckpt-every", 0, "an integer >= 1"),
    ("--eval-every", -1, "an integer >= 0"), ("--seed", -1, r"in \[0, 2\^30\)"),
    ("--seed", 2 ** 30, r"in \[0, 2\^30\)"), ("--device", "tpu", "cpu, cuda or cuda:N"),
])
def test_a_bad_training_option_is_one_line_naming_it(cli, tmp_path, option, value, allowed):
    code, out, err = cli(train, "--problem", "gp1d", option, value, "--out-dir", tmp_path / "run", "--no-progress")
    assert code == 2
    assert re.fullmatch(f"error: {option} must be {allowed}.*, got .*\n", err), err
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_a_bad_option_exits_2_from_the_shell_with_one_line(tmp_path):
    out = run("train.py", "--problem", "gp1d", "--steps", "-5", "--out-dir", tmp_path)
    assert out.returncode == 2
    assert out.stderr == "error: --steps must be an integer >= 1, got -5\n" and out.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_so(cli, tmp_path, gp1d_ckpt):
    code, _, err = cli(train, "--problem", "gp1d", "--device", "cuda", "--out-dir", tmp_path)
    assert code == 2 and "--device cuda: no GPU available" in err
    code, _, err = cli(sample, gp1d_ckpt, "--device", "cuda")
    assert code == 2 and "no GPU available" in err and "corrupt" not in err


def test_an_unwritable_out_dir_is_refused_at_start(cli, tmp_path):
    (tmp_path / "a_file").write_text("")
    code, _, err = cli(train, "--problem", "gp1d", "--out-dir", tmp_path / "a_file" / "run", "--no-progress")
    assert code == 2 and re.fullmatch(r"error: --out-dir .* must be a folder this user can write to \(.*\)\n", err)


def test_warmup_0_trains(tmp_path):
    cfg = config.make_config("gp1d", steps=2, batch_size=2, warmup=0, eval_every=0, out_dir=str(tmp_path))
    train.train(cfg, progress=False)
    assert step_of(tmp_path / "ckpt.pt") == 2


def test_a_stale_tmp_file_of_a_killed_run_is_removed_on_start(tmp_path):
    (tmp_path / "ckpt.tmp4242.pt").write_bytes(b"half a checkpoint")
    train.train(config.make_config("gp1d", steps=1, batch_size=2, eval_every=0, out_dir=str(tmp_path)), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


# -----------------------------------------------------------------------------
# train.py: resume


def test_resume_writes_beside_the_checkpoint_never_into_the_folder_stored_in_it(cli, tmp_path, gp1d_ckpt):
    original = gp1d_ckpt.read_bytes()
    os.makedirs(tmp_path / "copy")
    shutil.copy(gp1d_ckpt, tmp_path / "copy" / "kept.pt")
    code, out, err = cli(train, "--resume", tmp_path / "copy" / "kept.pt", "--steps", 3, "--no-progress")
    assert code == 0, err
    assert step_of(tmp_path / "copy" / "ckpt.pt") == 3 and step_of(tmp_path / "copy" / "kept.pt") == 2
    assert gp1d_ckpt.read_bytes() == original  # the run the checkpoint came from is untouched
    code, out, err = cli(train, "--resume", tmp_path / "copy" / "kept.pt", "--steps", 4, "--out-dir", tmp_path / "b",
                         "--no-progress")
    assert code == 0, err
    assert step_of(tmp_path / "b" / "ckpt.pt") == 4 and step_of(tmp_path / "copy" / "ckpt.pt") == 3


@pytest.mark.parametrize("steps", [[], ["--steps", 2], ["--steps", 1]])
def test_resume_refuses_steps_at_or_below_the_checkpoints(cli, gp1d_ckpt, steps):
    code, _, err = cli(train, "--resume", gp1d_ckpt, *steps, "--no-progress")
    assert code == 2 and err == "error: the checkpoint is at step 2: pass --steps > 2 to train longer\n"


@pytest.mark.parametrize("option", [["--problem", "flatland"], ["--model", "oracle"]])
def test_resume_refuses_another_problem_or_model_in_one_line(cli, gp1d_ckpt, option):
    code, _, err = cli(train, "--resume", gp1d_ckpt, "--steps", 3, *option, "--no-progress")
    assert code == 2
    assert err == ("error: the checkpoint holds problem gp1d, model dfm; "
                   "--problem and --model cannot change on resume\n")


def test_resume_may_change_only_how_long_how_often_and_where(cli, tmp_path, gp1d_ckpt):
    code, _, err = cli(train, "--resume", gp1d_ckpt, "--steps", 3, "--lr", 0.1, "--no-progress")
    assert code == 2 and err.startswith("error: --lr cannot change on resume (the checkpoint's is 0.001, not 0.1)")
    code, _, err = cli(train, "--resume", gp1d_ckpt, "--steps", 3, "--ckpt-every", 7, "--eval-every", 0,
                       "--device", "cpu", "--out-dir", tmp_path, "--no-progress")
    assert code == 0, err
    ckpt, cfg = train.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 3 and cfg.ckpt_every == 7 and cfg.out_dir == str(tmp_path)


# -----------------------------------------------------------------------------
# train.py: Ctrl-C, torchrun, --help


def test_ctrl_c_saves_a_checkpoint_and_prints_how_to_resume(tmp_path):
    args = ["--problem", "gp1d", "--steps", 10 ** 6, "--batch-size", 2, "--eval-every", 0, "--ckpt-every", 10 ** 6,
            "--out-dir", tmp_path]  # with the progress bar: it prints "training ..." as the loop starts
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, proc.kill)  # however slow the machine, never hang the test suite
    watchdog.start()
    try:
        started = proc.stderr.readline()  # printed just before the first step
        assert started.startswith("training gp1d/dfm from step 0"), started + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    finally:
        watchdog.cancel()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+); resume with: python train\.py --resume (.+)", last)
    assert match and match[2] == str(tmp_path / "ckpt.pt"), last
    step = int(match[1])
    assert step_of(match[2]) == step and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    cfg = config.make_config("gp1d", steps=step + 1, batch_size=2, eval_every=0, ckpt_every=10 ** 6,
                            out_dir=str(tmp_path))
    train.train(cfg, resume=match[2], progress=False)  # resumable, as the message says
    assert step_of(match[2]) == step + 1


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_under_torchrun_a_bad_option_is_reported_once(tmp_path):
    out = subprocess.run(["torchrun", "--nproc_per_node=2", "train.py", "--problem", "gp1d", "--batch-size", "3",
                          "--device", "cpu", "--out-dir", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TMPDIR": str(tmp_path)})  # torchrun's own temp files go there too
    assert out.returncode != 0
    message = "error: --batch-size must be an integer >= 1 divisible by the number of processes (2), got 3"
    assert (out.stdout + out.stderr).count(message) == 1
    assert 'train.py", line' not in out.stderr  # no traceback through train.py (torchrun adds its own report)
    assert not os.path.exists(tmp_path / "run")  # nothing created before the options were checked


def options_and_their_help(help_text):
    """{'--steps': 'its help text', ...} from argparse's --help output."""
    section = help_text.split("options:")[1]
    blocks = re.split(r"\n  (?=-)", "\n" + section)
    return {re.findall(r"--[\w-]+", b)[0]: " ".join(b.split()) for b in blocks if b.strip()}


@pytest.mark.parametrize("script", ["train.py", "sample.py", "-m experiments.bench"])
def test_help_says_what_every_option_does_and_its_default(script):
    out = run(*script.split(), "--help")
    assert out.returncode == 0, out.stderr
    options = options_and_their_help(out.stdout)
    assert len(options) >= 6
    for option, text in options.items():
        if option != "--help":
            assert "default" in text and len(text) > len(option) + 30, (option, text)
    if script == "train.py":
        assert "flatland 2000" in options["--steps"] and "gp1d 256" in options["--batch-size"]


# -----------------------------------------------------------------------------
# Checkpoints that are not


def test_files_that_are_not_checkpoints_get_one_line_and_no_unsafe_advice(cli, tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "text.pt").write_text("hello\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with open(tmp_path / "damaged.pt", "wb") as f:  # a real checkpoint, cut short
        torch.save({"config": {}, "model": {}, "ema": {}, "step": 0}, tmp_path / "whole.pt")
        f.write((tmp_path / "whole.pt").read_bytes()[:300])
    for name in ("random.pt", "text.pt", "other.pt", "damaged.pt"):
        code, _, err = cli(sample, tmp_path / name)
        assert code == 2 and err.count("\n") == 1 and "not a dfm checkpoint" in err, err
        assert "weights_only" not in err and "KeyError" not in err
        code, _, err = cli(train, "--resume", tmp_path / name, "--no-progress")
        assert code == 2 and "not a dfm checkpoint" in err, err


# -----------------------------------------------------------------------------
# sample.py


@pytest.mark.parametrize("args, message", [
    (["--n-samples", 0], "--n-samples must be an integer >= 2"),
    (["--n-samples", 1], "--n-samples must be an integer >= 2 (the distances compare sets of samples"),
    (["--n-contexts", 0], "--n-contexts must be an integer >= 1"),
    (["--steps", 0], "--steps must be in [1, 1000]"), (["--steps", 5000], "--steps must be in [1, 1000]"),
    (["--eta", -1], "--eta must be a number >= 0"), (["--temperature", 0], "--temperature must be a number > 0"),
    (["--guidance", 2], "--guidance must be 1 for this checkpoint: guidance needs a model trained with "
                        "--ctxt-drop-prob > 0"),
    (["--seed", -1], "--seed must be in [0, 2^30)"),
    (["--views-in-turn", 2], "--views-in-turn must be an integer >= 0, for a flatland checkpoint"),
    (["--figure", "no/such/folder/x.png"], "--figure 'no/such/folder/x.png': the folder 'no/such/folder' does not"),
    (["--figure", "x.txt"], "--figure 'x.txt' must end in an image format matplotlib writes: "),
])
def test_a_bad_sampling_option_is_refused_before_any_sampling(cli, monkeypatch, gp1d_ckpt, args, message):
    from toy_problems import gp1d
    monkeypatch.setattr(gp1d, "evaluate", lambda *a, **k: pytest.fail("sampled before checking the options"))
    code, out, err = cli(sample, gp1d_ckpt, *args)
    assert code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err


def test_sample_uses_the_problems_settings_and_passes_the_sampler_options(cli, monkeypatch, tmp_path, gp1d_ckpt):
    import dfm
    from toy_problems import gp1d
    calls, real_sample, real_evaluate = [], dfm.DFM.sample, gp1d.evaluate

    def spy(model, *args, **kwargs):
        calls.append(kwargs)
        return real_sample(model, *args, **kwargs)

    @functools.wraps(real_evaluate)  # with its signature, where sample.py reads the defaults
    def fake_evaluate(model, **kwargs):
        evaluated.append(kwargs)
        return {"window": 0.0}

    monkeypatch.setattr(dfm.DFM, "sample", spy)
    evaluated = []
    monkeypatch.setattr(gp1d, "evaluate", fake_evaluate)
    code, out, err = cli(sample, gp1d_ckpt, "--figure", tmp_path / "a.png")
    assert code == 0, err
    assert evaluated == [dict(seed=0, n_contexts=64, n_samples=64, steps=50)]  # gp1d.evaluate's defaults, as in bench
    assert "64 held-out contexts x 64 samples, ddim with 50 steps" in out

    monkeypatch.setattr(gp1d, "evaluate", real_evaluate)
    calls.clear()
    code, out, err = cli(sample, gp1d_ckpt, "--n-contexts", 2, "--n-samples", 2, "--steps", 2, "--sampler", "ddpm",
                         "--temperature", 0.5, "--figure", tmp_path / "b.png")
    assert code == 0, err
    assert calls and all(c["sampler"] == "ddpm" and c["temperature"] == 0.5 and c["steps"] == 2 for c in calls)
    assert "sampling" in err  # the progress bar
    assert "2 held-out contexts x 2 samples, ddpm with 2 steps, temperature 0.5" in out
    assert (tmp_path / "b.png").exists()


def test_views_in_turn_reach_flatlands_scores_and_pictures(cli, monkeypatch, tmp_path):
    from toy_problems import flatland
    code, _, err = cli(train, "--steps", 1, "--batch-size", 2, "--out-dir", tmp_path / "run", "--no-progress")
    assert code == 0, err
    seen = []
    real = flatland.draw_samples
    monkeypatch.setattr(flatland, "draw_samples", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    code, out, err = cli(sample, tmp_path / "run" / "ckpt.pt", "--n-contexts", 1, "--n-samples", 2, "--steps", 1,
                         "--views-in-turn", 1, "--figure", tmp_path / "f.png")
    assert code == 0, err
    assert seen and set(seen) == {1} and "1 views in turn" in out  # the scores, the figure and the orbit
    code, _, err = cli(sample, tmp_path / "run" / "ckpt.pt", "--views-in-turn", -1)
    assert code == 2 and "--views-in-turn must be an integer >= 0" in err


def test_the_quick_start_trains_then_samples(tmp_path):
    out = run("train.py", "--steps", "2", "--batch-size", "2", "--out-dir", tmp_path, "--no-progress")
    assert out.returncode == 0, out.stderr
    out = run("sample.py", tmp_path / "ckpt.pt", "--n-contexts", "2", "--n-samples", "2", "--steps", "2")
    assert out.returncode == 0, out.stderr
    assert "_floor" in out.stdout and (tmp_path / "samples.png").exists()  # flatland is the default


# -----------------------------------------------------------------------------
# experiments/bench.py, and nothing left behind


def test_bench_writes_figures_under_out_and_states_the_steps_it_used(cli, monkeypatch, tmp_path):
    from toy_problems import gp1d
    plots = []
    monkeypatch.setattr(gp1d, "TRAIN_DEFAULTS", dict(gp1d.TRAIN_DEFAULTS, batch_size=2))
    monkeypatch.setattr(gp1d, "evaluate", lambda model, seed=0: {"window": 0.5, "window_floor": 0.1})
    monkeypatch.setattr(gp1d, "plot", lambda model, path, seed=0: plots.append(path))
    monkeypatch.setattr(bench, "time_sampling", lambda *a, **k: 1.0)
    code, out, err = cli(bench, "--problem", "gp1d", "--steps", 2, "--eval-every", 0, "--out", tmp_path / "bench",
                         "--no-progress")
    assert code == 0, err
    assert "gp1d: 2 steps x batch 2 per model" in out
    assert plots == [str(tmp_path / "bench" / "figures" / f"gp1d-{kind}.png") for kind in bench.KINDS]
    code, out, err = cli(bench, "--problem", "gp1d", "--steps", 1, "--eval-every", 0, "--out", tmp_path / "bench",
                         "--no-progress")
    assert code == 2 and "the checkpoint is at step 2, past --steps 1" in err  # not silently the 2-step runs


def test_the_motion_and_gan_notebook_deletes_its_temporary_folder():
    with open(os.path.join(ROOT, "notebooks", "motion_and_gan.ipynb")) as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    assert "OUT = tempfile.mkdtemp()" in "".join(cells[0]["source"])
    assert "shutil.rmtree(OUT" in "".join(cells[-1]["source"])
