"""Train DFM, or one of its two comparison models, on a toy problem.

    python train.py                                   # DFM on flatland, on the CPU, in a few minutes
    python train.py --problem gp1d --model oracle     # the comparison models: deterministic, oracle
    python train.py --resume out/flatland-dfm/ckpt.pt --steps 4000  # continue exactly, then train longer
    torchrun --nproc_per_node=2 train.py              # the same run, data-parallel (DDP)

Every run writes out/<problem>-<model>/ckpt.pt now and then, atomically (write, then
rename), so a crash never corrupts the last good checkpoint; Ctrl-C saves one at the
current step and stops; a new run never replaces another run's checkpoint unless told to
(--overwrite). The random numbers of step k are drawn from a generator seeded by
(seed, k, rank) (toy_problems.stream_seed), so the step counter *is* the RNG state: a
resumed run draws exactly what the uninterrupted run would have, and no training step ever
draws from the held-out stream that evaluation uses.

Resuming continues the *same* run: it writes beside the checkpoint it resumed (or into
--out-dir), and only how long it runs, how often it reports and saves, and where it runs
may change (config.RESUMABLE); everything else (problem, model, batch, optimiser, schedule, seed)
is the checkpoint's, and asking for another value is an error.
"""
import argparse
import copy
import dataclasses
import glob
import math
import os
import signal
import sys
import threading
import time
import zipfile

# Before torch loads: idle OpenMP threads spin (fastest) if the machine is idle as the command starts, else sleep,
# because spinning threads take the time that their descheduled siblings need (RESULTS.md, Speed); a system
# without a load average (Windows) gets the safe choice, sleep
load_average = getattr(os, "getloadavg", lambda: (float("inf"),))()[0]
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if load_average < 0.5 else "PASSIVE")

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import dfm
import toy_problems
from config import (MODELS, RESUMABLE, Config, check_device, check_memory, make_config, option_help,
                    problems_for_help, resolve)

CURVE_EVAL = dict(n_contexts=16, n_samples=32, steps=20)  # the quick scores of --eval-every (the learning curve)


def load_problem(cfg, progress=True):
    """The problem of a run: a toy, or with --data the 3D model on posed images from disk
    (posed_images/problem.py), whose indexing and caching show progress bars if `progress`."""
    if cfg.data:
        from posed_images import problem
        return problem.make_problem(cfg.problem, cfg.data, cfg.format, cfg.frame_window, cfg.workers, progress)
    return toy_problems.load(cfg.problem)


def build_model(cfg):
    """The model of a config, trained with its problem's observation loss if the problem has one (the 3D
    problems': L2 plus LPIPS); with --forward-error its forward model is not the one that made the data."""
    problem = load_problem(cfg)
    forward_model = (problem.forward if cfg.forward_error == "none" else
                     problem.forward_with_error(cfg.forward_error, cfg.forward_error_size))
    return dfm.make_model(cfg.model, problem.make_denoiser(cfg.model), forward_model, cfg.timesteps,
                          ctxt_drop_prob=cfg.ctxt_drop_prob, obs_loss=getattr(problem, "obs_loss", None),
                          novel_weight=cfg.novel_weight)


def learning_rate(cfg, step):
    """The learning rate of a step: linear warm-up over cfg.warmup steps, times the cosine decay to 0 at
    cfg.steps with --lr-schedule cosine."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup))
    decay = 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps)) if cfg.lr_schedule == "cosine" else 1.0
    return cfg.lr * warmup * decay


def training_batch(problem, cfg, views, generator, batch_size, device):
    """The batch of one step: from the fixed data set `views` if the run has one (--signals), else
    new signals from the prior, with 1..cfg.contexts context views if that is set."""
    if views is not None:
        return problem.finite_batch(views, batch_size, generator, device)
    if cfg.contexts:  # a draw only where there is a choice: --contexts 1 leaves the generator where it was
        n_ctxt = int(torch.randint(1, cfg.contexts + 1, (), generator=generator)) if cfg.contexts > 1 else 1
        return problem.sample_batch(batch_size, generator, device, n_ctxt=n_ctxt)
    return problem.sample_batch(batch_size, generator, device)


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)  # e = decay * e + (1 - decay) * p


def prepare_out_dir(out_dir):
    """Make the output folder and prove it writable now, not at the first checkpoint minutes later;
    remove the ckpt.tmp<pid>.pt that a run killed while saving leaves behind. Returns whether it made the folder."""
    probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir!r} must be a folder this user can write to ({e.strerror})") from None
    for stale in glob.glob(os.path.join(glob.escape(out_dir), "ckpt.tmp*.pt")):
        os.remove(stale)
    return created


def check_new_run(path, resume=None, overwrite=False):
    """Nothing a user made is lost: refuse, before anything is written, to write a run's checkpoint over
    another one (a finished quick start, say), unless it is the checkpoint being resumed or overwrite is set."""
    if overwrite or not os.path.exists(path) or (resume and os.path.exists(resume) and os.path.samefile(path, resume)):
        return
    raise ValueError(f"--out-dir {os.path.dirname(path)} already holds a run's checkpoint: continue that run with "
                     f"--resume {path} --steps N, start a new run with another --out-dir, "
                     "or replace it with --overwrite")


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: the old checkpoint survives any crash mid-write."""
    with toy_problems.written_whole(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, device="cpu"):
    """Returns (checkpoint dict, Config); a one-line ValueError for anything that is not a dfm checkpoint."""
    check_device(device)
    if os.path.isdir(path):
        inside = os.path.join(path, "ckpt.pt")
        raise ValueError(f"{path!r} is a folder; pass the checkpoint file" +
                         (f" in it: {inside}" if os.path.isfile(inside) else " (train.py writes <out-dir>/ckpt.pt)"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: train one first with `python train.py`")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose index is at its end
        with open(path, "rb") as f:
            begins_like_one = f.read(4) == b"PK\x03\x04"
        raise ValueError(f"{path!r} is not a dfm checkpoint: " +
                         ("damaged or truncated (it begins like a file written by torch.save, but its end is "
                          "missing: was it copied completely?)" if begins_like_one else
                          "not a file written by torch.save (train.py writes ckpt.pt)"))
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # not its message: it suggests weights_only=False, which is unsafe and not the fix
        raise ValueError(f"{path!r} is not a dfm checkpoint, or a damaged one: torch.load failed "
                         f"({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and {"config", "model", "ema", "step"} <= ckpt.keys()
            and isinstance(ckpt["config"], dict)):
        raise ValueError(f"{path!r} is not a dfm checkpoint: expected the keys config, model, ema, step")
    unknown = set(ckpt["config"]) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path!r} has config fields this train.py does not know: {', '.join(sorted(unknown))}")
    return ckpt, Config(**{**dataclasses.asdict(Config()), **ckpt["config"]})


def load_ema_model(path, device="cpu"):
    """The EMA model of a checkpoint, ready for sampling, and its Config."""
    ckpt, cfg = load_checkpoint(path, device)
    model = build_model(cfg).to(device)
    model.load_state_dict(ckpt["ema"])
    return model.eval(), cfg


def check_resume(cfg, saved, step):
    """A resumed run is the same run: only the RESUMABLE fields may differ from the checkpoint's (saved),
    and it must not already be past cfg.steps (resuming a finished run just loads it)."""
    if (cfg.problem, cfg.model) != (saved.problem, saved.model):
        raise ValueError(f"the checkpoint holds problem {saved.problem}, model {saved.model}; "
                         "--problem and --model cannot change on resume")
    for field in dataclasses.fields(Config):
        new, old = getattr(cfg, field.name), getattr(saved, field.name)
        if field.name not in RESUMABLE and new != old:
            raise ValueError(f"--{field.name.replace('_', '-')} cannot change on resume (the checkpoint's is {old!r}, "
                             f"not {new!r}); start a new run in another --out-dir instead")
    if step > cfg.steps:
        raise ValueError(f"the checkpoint is at step {step}, past --steps {cfg.steps}; pass --steps > {step}")
    if cfg.lr_schedule == "cosine" and cfg.steps != saved.steps:
        raise ValueError(f"--steps cannot change on resume with --lr-schedule cosine, whose decay ends at the "
                         f"checkpoint's --steps {saved.steps}; start a new run in another --out-dir instead")


def train(cfg, resume=None, progress=True, overwrite=False):
    """Train as configured; returns (EMA model, seconds per step over the whole run, resumed parts included).

    Works alone or under torchrun. Resuming a finished run just loads it. A new run refuses to replace
    the checkpoint of another in cfg.out_dir unless overwrite is set. The first Ctrl-C (SIGINT)
    saves a checkpoint at the current step and raises KeyboardInterrupt("interrupted at step N; ...").
    """
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # Every check before anything is written, and before init_process_group, so that a bad option stops
    # every process alike and leaves nothing behind.
    cfg.validate(world)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if resume:
        ckpt, saved = load_checkpoint(resume)
        check_resume(cfg, saved, ckpt["step"])
    check_new_run(path, resume, overwrite)
    check_memory(cfg, world)
    problem = load_problem(cfg, progress and rank == 0)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = build_model(cfg)  # a model the problem does not have (scenes3d's oracle) is refused here
    first_step = ckpt["step"] if resume else 0
    # a data set on disk is indexed and checked here, frame by frame, before the output folder exists
    batches = (problem.loader(cfg.batch_size // world, cfg.seed, rank, range(first_step, cfg.steps)) if cfg.data
               else None)
    created = prepare_out_dir(cfg.out_dir)
    if distributed:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        if cfg.device == "cuda":
            cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    views = (problem.sample_views(cfg.signals, cfg.views, toy_problems.dataset_generator(cfg.seed))
             if cfg.signals else None)  # the fixed data set, the same on every process and on resume
    device = torch.device(cfg.device)
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, train_seconds, saved_step = 0, 0.0, None
    curve = []  # the learning curve: [{"step": k, **scores}] from the evaluations every cfg.eval_every steps
    if resume:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])  # moves its state to the parameters' device
        step, train_seconds, curve = ckpt["step"], ckpt["train_seconds"], ckpt.get("curve", [])
    ddp_model = DistributedDataParallel(model) if distributed else model

    def checkpoint():
        nonlocal saved_step
        if rank == 0:
            save_checkpoint(path, dict(config=dataclasses.asdict(cfg), model=model.state_dict(), ema=ema.state_dict(),
                                       optimizer=optimizer.state_dict(), step=step, curve=curve,
                                       train_seconds=train_seconds + time.perf_counter() - start_time - eval_seconds))
        saved_step = step

    # Ctrl-C only raises a flag; the loop stops at the next step boundary, where model, EMA, optimiser
    # and step agree, and saves there. A second Ctrl-C interrupts at once (the last checkpoint survives).
    interrupted = []
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers live
    if in_main_thread:
        def on_sigint(signum, frame):
            interrupted.append(signum)
            signal.signal(signal.SIGINT, previous_handler)
        previous_handler = signal.getsignal(signal.SIGINT) or signal.default_int_handler
        signal.signal(signal.SIGINT, on_sigint)

    if progress and rank == 0:
        print(f"training {cfg.problem}/{cfg.model} from step {step} to {cfg.steps} on {cfg.device}; "
              f"checkpoints: {path} (Ctrl-C saves one and stops)", file=sys.stderr, flush=True)
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or rank != 0, desc=f"{cfg.problem}/{cfg.model}")
    start_time, eval_seconds, smooth_loss = time.perf_counter(), 0.0, None  # evaluations do not count as training time
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    try:
        while step < cfg.steps:
            seed = toy_problems.stream_seed("train", cfg.seed, step, rank)  # this step's randomness, see the docstring
            torch.manual_seed(seed)
            generator = toy_problems.train_generator(cfg.seed, step, rank)
            batch = (dfm.map_batch(lambda v: v.to(device), next(batches)) if batches is not None else  # made ahead
                     training_batch(problem, cfg, views, generator, cfg.batch_size // world, device))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            with autocast:
                loss = ddp_model(batch)
            stop = torch.tensor([float(not torch.isfinite(loss)), float(bool(interrupted))], device=device)
            if distributed:
                dist.all_reduce(stop)  # every process stops at the same step
            if stop[1] > 0:
                checkpoint()
                raise KeyboardInterrupt(f"interrupted at step {step}; resume with: python train.py --resume {path}")
            if stop[0] > 0:
                kept = (f"{path} keeps the checkpoint of step {saved_step}" if saved_step is not None else
                        f"no checkpoint was written; {resume} (step {first_step}) is untouched" if resume else
                        "no checkpoint was written")
                raise FloatingPointError(f"the loss became {loss.item()} at step {step}; stopped: {kept}. "
                                         "Try a lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            ema_update(ema, model, cfg.ema_decay)
            step += 1
            smooth_loss = loss.item() if smooth_loss is None else 0.98 * smooth_loss + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smooth_loss:.4f}")
            if cfg.eval_every and step % cfg.eval_every == 0:  # before the checkpoint, which then holds it
                eval_start = time.perf_counter()
                if rank == 0:
                    scores = problem.evaluate(ema, seed=cfg.seed, **{**CURVE_EVAL, "steps": min(CURVE_EVAL["steps"],
                                                                                          cfg.timesteps)})
                    curve.append({"step": step, **scores})
                    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), file=sys.stderr)
                eval_seconds += time.perf_counter() - eval_start
                bar.unpause()  # the evaluation's time is not training time: keep it out of the bar's ETA
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
    finally:
        bar.close()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
        if created and rank == 0 and not os.listdir(cfg.out_dir):  # a run stopped before any checkpoint: no folder
            os.rmdir(cfg.out_dir)
    seconds_per_step = (train_seconds + time.perf_counter() - start_time - eval_seconds) / max(1, step)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return ema.eval(), seconds_per_step


def train_or_resume(cfg, progress=True):
    """The run of cfg: finished (or, if done, just loaded) from the checkpoint in cfg.out_dir, else started;
    returns (EMA model, seconds per step). A checkpoint there of another config is refused (check_resume)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    return train(cfg, resume=path if os.path.exists(path) else None, progress=progress)


def main():
    problem_defaults = {name: problem.TRAIN_DEFAULTS for name, problem in problems_for_help().items()}
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="Options left out take the problem's defaults, or on --resume the checkpoint's. On --resume only "
               f"{', '.join('--' + f.replace('_', '-') for f in RESUMABLE)} may change.")
    for field in dataclasses.fields(Config):  # default None: only the options given override anything
        choices = {"problem": toy_problems.PROBLEMS, "model": MODELS}.get(field.name)
        parser.add_argument("--" + field.name.replace("_", "-"), type=field.type, choices=choices,
                            help=option_help(field, problem_defaults))
    parser.add_argument("--resume", metavar="CKPT", help="continue the run of this checkpoint exactly, writing "
                        "beside it (or into --out-dir); with --steps > its step to train longer (default: a new run)")
    parser.add_argument("--overwrite", action="store_true", help="let a new run replace the checkpoint already "
                        "in its --out-dir (default: refuse, so that no finished run is lost)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: show one)")
    args = parser.parse_args()
    given = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    say = int(os.environ.get("RANK", 0)) == 0  # under torchrun, only the first process prints errors
    try:
        if args.resume:
            ckpt, saved = load_checkpoint(args.resume)
            # device: this machine's unless given; out_dir: beside the checkpoint, never the folder stored in it
            cfg = resolve(dataclasses.replace(saved, **{"device": "", "out_dir": os.path.dirname(args.resume) or ".",
                                                        **given}))
            if cfg.steps <= ckpt["step"]:
                raise ValueError(f"the checkpoint is at step {ckpt['step']}: pass --steps > {ckpt['step']} "
                                 "to train longer")
        else:
            cfg = make_config(**given)
        _, seconds_per_step = train(cfg, resume=args.resume, progress=not args.no_progress,
                                    overwrite=args.overwrite)
    except KeyboardInterrupt as e:
        if say:
            print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # one line; a bad option or file: status 2
        if say:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, FloatingPointError) else 2)  # the same on every process
    if say:
        print(f"done: {cfg.steps} steps, {1000 * seconds_per_step:.1f} ms/step; checkpoint {cfg.out_dir}/ckpt.pt")


if __name__ == "__main__":
    main()
