"""Training infrastructure: exact resume, atomic checkpoints, the NaN stop, DDP (the command lines: test_cli.py)."""
import os
import shutil
import subprocess

import pytest
import torch

import dfm
import config
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(out_dir, steps=6, ckpt_every=3):
    return config.make_config("gp1d", steps=steps, batch_size=16, eval_every=0, ckpt_every=ckpt_every,
                             out_dir=str(out_dir))


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return {**{"model." + k: v for k, v in ckpt["model"].items()}, **{"ema." + k: v for k, v in ckpt["ema"].items()}}


def test_resume_continues_exactly(tmp_path):
    train.train(tiny_config(tmp_path / "straight"), progress=False)
    train.train(tiny_config(tmp_path / "halves", steps=3), progress=False)
    train.train(tiny_config(tmp_path / "halves"), resume=str(tmp_path / "halves" / "ckpt.pt"), progress=False)
    a, b = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "halves" / "ckpt.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["problem"] == "gp1d" and ckpt["optimizer"]["state"]


def test_the_cosine_schedule_decays_to_zero_at_the_last_step_after_the_warm_up():
    cfg = config.make_config("gp1d", steps=1000, lr=1e-3, warmup=100, lr_schedule="cosine")
    lr = [train.learning_rate(cfg, step) for step in range(cfg.steps)]
    assert lr[0] == pytest.approx(1e-5, rel=0.01)  # warm-up: a hundredth of --lr at the first step
    assert lr[500] == pytest.approx(0.5e-3) and lr[-1] < 1e-8 and max(lr) < 1e-3
    assert all(a > b for a, b in zip(lr[100:], lr[101:]))  # falls at every step after the warm-up
    constant = config.make_config("gp1d", steps=1000, lr=1e-3, warmup=100)
    assert [train.learning_rate(constant, step) for step in (99, 500, 999)] == [1e-3] * 3


def test_a_cosine_run_resumes_exactly_but_not_to_another_length(tmp_path, monkeypatch):
    def cosine_config(out_dir, steps=6):
        return config.make_config("gp1d", steps=steps, batch_size=16, eval_every=0, ckpt_every=3, warmup=2,
                                  lr_schedule="cosine", out_dir=str(out_dir))
    save = train.save_checkpoint

    def save_and_keep_step_3(path, ckpt):  # keeps a copy of the straight run's checkpoint at step 3
        save(path, ckpt)
        if ckpt["step"] == 3:
            os.makedirs(tmp_path / "halves")
            shutil.copy(path, tmp_path / "halves" / "ckpt.pt")
    monkeypatch.setattr(train, "save_checkpoint", save_and_keep_step_3)
    train.train(cosine_config(tmp_path / "straight"), progress=False)
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.train(cosine_config(tmp_path / "halves"), resume=str(tmp_path / "halves" / "ckpt.pt"), progress=False)
    a, b = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "halves" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--steps cannot change on resume with --lr-schedule cosine"):
        train.train(cosine_config(tmp_path / "halves", steps=9), resume=str(tmp_path / "halves" / "ckpt.pt"),
                    progress=False)


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1})

    def crash(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 1}


def loss_that_breaks_after(n, monkeypatch):
    """Make the training loss NaN from call n + 1 on."""
    calls, real_loss = [], dfm.DFM.forward

    def loss(model, batch):
        calls.append(1)
        return real_loss(model, batch) * (1 if len(calls) <= n else float("nan"))

    monkeypatch.setattr(dfm.DFM, "forward", loss)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    loss_that_breaks_after(4, monkeypatch)
    with pytest.raises(FloatingPointError, match=r"step 4; stopped: .*ckpt.pt keeps the checkpoint of step 4"):
        train.train(tiny_config(tmp_path, ckpt_every=2), progress=False)
    ckpt, _ = train.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_loss_before_any_checkpoint_says_none_was_written(tmp_path, monkeypatch):
    loss_that_breaks_after(1, monkeypatch)
    with pytest.raises(FloatingPointError, match=r"step 1; stopped: no checkpoint was written\."):
        train.train(tiny_config(tmp_path, ckpt_every=5), progress=False)
    assert not (tmp_path / "ckpt.pt").exists()


def test_missing_and_corrupt_checkpoints_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a dfm checkpoint: not a file written by torch.save"):
        train.load_checkpoint(str(tmp_path / "bad.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dfm checkpoint: expected the keys"):
        train.load_checkpoint(str(tmp_path / "other.pt"))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_with_two_processes(tmp_path):
    out = subprocess.run(["torchrun", "--nproc_per_node=2", "train.py", "--steps", "4", "--batch-size", "8",
                          "--out-dir", str(tmp_path), "--no-progress", "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TMPDIR": str(tmp_path)})  # torchrun's own temp files go there too
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt, cfg = train.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 4 and cfg.batch_size == 8


def first_draws(generator, n=4):
    """What a generator actually draws: the property the streams promise is about these numbers."""
    return tuple(torch.rand(n, generator=generator).tolist())


def test_distinct_seeds_draw_distinct_training_numbers():
    import toy_problems
    draws = {first_draws(toy_problems.train_generator(s, k, r)) for s in range(3) for k in range(200) for r in range(3)}
    assert len(draws) == 3 * 200 * 3  # every (seed, step, rank) draws its own numbers
    # the defect this replaces: torch keeps 32 bits of a seed, so --seed was packed away and lost
    assert first_draws(torch.Generator().manual_seed(2 ** 40 + 7)) == first_draws(torch.Generator().manual_seed(7))


def test_no_training_step_or_data_set_draws_what_the_held_out_stream_draws():
    import toy_problems
    held_out = [first_draws(toy_problems.held_out_generator(s)) for s in range(1000)]
    assert len(set(held_out)) == 1000  # every evaluation seed its own contexts
    training = {first_draws(toy_problems.train_generator(s, k, r))
                for s in range(4) for k in range(500) for r in range(4)}
    datasets = {first_draws(toy_problems.dataset_generator(s)) for s in range(1000)}
    assert not training & set(held_out) and not datasets & set(held_out) and not datasets & training
    with pytest.raises(ValueError, match="seed"):
        toy_problems.stream_seed("train", -1)
    with pytest.raises(ValueError, match="seed"):
        toy_problems.stream_seed("held_out", 2 ** 30)


@pytest.mark.parametrize("name", ["gp1d", "flatland", "motion", "gan_inversion", "scenes3d"])
def test_every_problem_gets_other_data_for_other_seeds(name):
    import toy_problems
    problem = toy_problems.load(name)
    key = "ctxt_obs"
    held = [problem.held_out_batch(4, seed=s)[key] for s in range(3)]
    train0, train1 = (problem.sample_batch(4, toy_problems.train_generator(s, 0))[key] for s in range(2))
    assert not torch.equal(train0, train1)  # --seed 0 and --seed 1 train on different data
    assert not torch.equal(held[0], held[1]) and not torch.equal(held[1], held[2])  # evaluate(seed=...) too
    for x in (train0, train1):
        assert not any(torch.equal(x, h) for h in held)


@pytest.mark.parametrize("problem", ["gp1d", "flatland", "motion", "gan_inversion"])
def test_every_problem_trains_with_another_number_of_timesteps(problem, tmp_path):
    cfg = config.make_config(problem, steps=1, batch_size=2, timesteps=2000, eval_every=0, out_dir=str(tmp_path))
    model, _ = train.train(cfg, progress=False)
    assert model.timesteps == 2000 and len(model.abar) == 2000


def test_a_problem_may_set_any_config_field(monkeypatch):
    from toy_problems import gp1d
    monkeypatch.setattr(gp1d, "TRAIN_DEFAULTS", dict(steps=7, warmup=3, ctxt_drop_prob=0.1))
    cfg = config.make_config("gp1d", steps=9)
    assert (cfg.steps, cfg.warmup, cfg.ctxt_drop_prob) == (9, 3, 0.1)
    assert train.build_model(cfg).ctxt_drop_prob == 0.1
    monkeypatch.setattr(gp1d, "TRAIN_DEFAULTS", dict(stepz=7))
    with pytest.raises(ValueError, match="stepz"):
        config.make_config("gp1d")


class MeanAbsoluteDifference(torch.nn.Module):
    """A stand-in for the LPIPS network, called as lpips' is: (x, y) -> (B, 1, 1, 1)."""

    def forward(self, x, y):
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_the_model_train_builds_uses_its_problems_observation_loss(monkeypatch):
    from toy_problems import scenes3d
    monkeypatch.setattr(scenes3d, "lpips_or_none", lambda: MeanAbsoluteDifference())  # no weights in tests
    cfg = config.make_config("scenes3d-64")
    assert cfg.problem == "scenes3d-64" and scenes3d.SETTINGS["scenes3d-64"].lpips == 0.2
    model = train.build_model(cfg)
    P = scenes3d.SETTINGS["scenes3d-64"].patch ** 2
    target = torch.rand(2, 3, P, generator=torch.Generator().manual_seed(0)) * 2 - 1  # two patches (B, 3, P)
    pred = target + 0.3  # MSE 0.09; the stand-in's distance is 0.3 at any resolution
    assert model.obs_loss(pred, target).item() == pytest.approx(0.09 + 0.2 * 0.3, rel=1e-5)
    # a problem without an observation loss of its own trains with plain MSE
    assert train.build_model(config.make_config("gp1d")).obs_loss(pred, target).item() == pytest.approx(0.09, rel=1e-5)


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    cfg = config.make_config("flatland", steps=2, batch_size=2, precision="bf16", eval_every=0, out_dir=str(tmp_path))
    model, _ = train.train(cfg, progress=False)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_is_bf16_on_a_gpu_and_for_3d_on_a_cpu_with_bf16_instructions(has_bf16, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for problem in ("gp1d", "flatland", "motion", "gan_inversion", "scenes3d", "scenes3d-64"):
        on_cpu = config.resolve(config.Config(problem=problem, device="cpu")).precision
        assert on_cpu == ("bf16" if has_bf16 and problem.startswith("scenes3d") else "fp32"), problem
        assert config.bf16_by_default(problem, "cuda:0")
    assert config.resolve(config.Config(problem="scenes3d", device="cpu", precision="fp32")).precision == "fp32"


def test_the_progress_bar_times_training_steps_not_the_evaluation(tmp_path, monkeypatch):
    """On a fake clock, steps take 1 s and the in-training evaluation 1000 s (flatland's takes about 19 s
    at step 1000): the bar's rate, from which it computes its ETA, stays at one step per second."""
    import tqdm.std
    from toy_problems import gp1d
    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])  # the clock tqdm reads
    real_batch, bars = train.training_batch, []

    def one_second_step(*args, **kwargs):
        clock[0] += 1.0
        return real_batch(*args, **kwargs)

    def slow_evaluation(model, **kwargs):
        clock[0] += 1000.0
        return {"window": 0.0}

    class Bar(train.tqdm):
        def close(self):  # what the bar last showed: steps done, and its smoothed steps per second
            bars.append((self.n, self.format_dict["rate"]))
            super().close()

    monkeypatch.setattr(train, "training_batch", one_second_step)
    monkeypatch.setattr(gp1d, "evaluate", slow_evaluation)
    monkeypatch.setattr(train, "tqdm", Bar)
    cfg = config.make_config("gp1d", steps=8, batch_size=2, eval_every=4, out_dir=str(tmp_path))
    train.train(cfg, progress=True)
    steps, rate = bars[0]  # when train() closed it
    assert steps == 8 and rate == pytest.approx(1.0, rel=0.05)
