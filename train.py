"""Train DFM, or one of its two comparison models, on a toy problem.

    python train.py                                   # DFM on flatland, on the CPU, in a few minutes
    python train.py --problem gp1d --model oracle     # the comparison models: deterministic, oracle
    python train.py --resume out/flatland-dfm/ckpt.pt # continue exactly where a run stopped
    torchrun --nproc_per_node=2 train.py              # the same run, data-parallel (DDP)

Every run writes out/<problem>-<model>/ckpt.pt now and then, atomically (write, then
rename), so a crash or Ctrl-C never corrupts the last good checkpoint. The random numbers
of step k are drawn from a generator seeded by (seed, k, rank) (toy_problems.stream_seed), so
the step counter *is* the RNG state: a resumed run draws exactly what the uninterrupted run
would have, and no training step ever draws from the held-out stream that evaluation uses.
"""
import argparse
import copy
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import dfm
import toy_problems


@dataclass
class Config:
    """Everything a run depends on; saved in every checkpoint. A problem's TRAIN_DEFAULTS override
    these defaults, and the command line overrides both (see make_config)."""
    problem: str = "flatland"  # which toy problem (a module of toy_problems/)
    model: str = "dfm"  # dfm | deterministic | oracle
    steps: int = 2000  # optimisation steps
    batch_size: int = 32  # examples per step, over all processes
    lr: float = 1e-3  # Adam learning rate after warm-up
    warmup: int = 200  # steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # clip the gradient norm at this value
    ema_decay: float = 0.995  # EMA of the weights, used for sampling
    timesteps: int = 1000  # diffusion steps T
    ctxt_drop_prob: float = 0.0  # probability of hiding the context, for classifier-free guidance
    precision: str = "auto"  # fp32 | bf16 (autocast; compositing stays float32) | auto = bf16 on a GPU, fp32 on the CPU
    eval_every: int = 1000  # steps between quick evaluations against the exact posterior (0 = never)
    ckpt_every: int = 500  # steps between checkpoints
    seed: int = 0
    out_dir: str = ""  # where ckpt.pt goes; "" = out/<problem>-<model>
    device: str = ""  # "" = cuda if available, else cpu


def make_config(problem="flatland", **overrides):
    """The config of a new run: Config's defaults, then the problem's TRAIN_DEFAULTS, then the overrides."""
    defaults = toy_problems.load(problem).TRAIN_DEFAULTS
    unknown = set(defaults) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{problem}.TRAIN_DEFAULTS sets unknown config fields: {', '.join(sorted(unknown))}")
    return resolve(Config(problem=problem, **{**defaults, **overrides}))


def resolve(cfg):
    """Fill in what depends on the machine or on other fields: the output folder, device and precision."""
    cfg.out_dir = cfg.out_dir or os.path.join("out", f"{cfg.problem}-{cfg.model}")
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.precision == "auto":
        cfg.precision = "bf16" if cfg.device.startswith("cuda") else "fp32"
    return cfg


def build_model(cfg):
    problem = toy_problems.load(cfg.problem)
    return dfm.make_model(cfg.model, problem.make_denoiser(cfg.model), problem.forward, cfg.timesteps,
                          ctxt_drop_prob=cfg.ctxt_drop_prob)


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)  # e = decay * e + (1 - decay) * p


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: the old checkpoint survives any crash mid-write."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """Returns (checkpoint dict, Config); clear errors for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: train one first with `python train.py`")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path!r} is corrupt or not a dfm checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or not {"config", "model", "ema", "step"} <= ckpt.keys():
        raise RuntimeError(f"checkpoint {path!r} is not a dfm checkpoint: expected keys config, model, ema, step")
    return ckpt, Config(**{**dataclasses.asdict(Config()), **ckpt["config"]})


def load_ema_model(path, device="cpu"):
    """The EMA model of a checkpoint, ready for sampling, and its Config."""
    ckpt, cfg = load_checkpoint(path, device)
    model = build_model(cfg).to(device)
    model.load_state_dict(ckpt["ema"])
    return model.eval(), cfg


def train(cfg, resume=None, progress=True):
    """Train as configured; returns (EMA model, seconds per step over the whole run, resumed parts included).

    Works alone or under torchrun. Resuming a finished run just loads it.
    """
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.device == "cuda":
            cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    else:
        rank, world = 0, 1
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    problem = toy_problems.load(cfg.problem)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, train_seconds = 0, 0.0
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if resume:
        ckpt, _ = load_checkpoint(resume, device)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, train_seconds = ckpt["step"], ckpt["train_seconds"]
    ddp_model = DistributedDataParallel(model) if distributed else model

    def checkpoint():
        if rank == 0:
            save_checkpoint(path, dict(config=dataclasses.asdict(cfg), model=model.state_dict(), ema=ema.state_dict(),
                                       optimizer=optimizer.state_dict(), step=step,
                                       train_seconds=train_seconds + time.perf_counter() - start_time))

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or rank != 0, desc=f"{cfg.problem}/{cfg.model}")
    start_time, smooth_loss = time.perf_counter(), None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    while step < cfg.steps:
        seed = toy_problems.stream_seed("train", cfg.seed, step, rank)  # this step's randomness, see the docstring
        torch.manual_seed(seed)
        batch = problem.sample_batch(cfg.batch_size // world, toy_problems.train_generator(cfg.seed, step, rank), device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        with autocast:
            loss = ddp_model(batch)
        bad = torch.tensor(float(not torch.isfinite(loss)), device=device)
        if distributed:
            dist.all_reduce(bad)
        if bad > 0:
            bar.close()
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}; stopping without saving, so "
                                     f"{path} keeps the last good checkpoint. Try a lower --lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema_update(ema, model, cfg.ema_decay)
        step += 1
        smooth_loss = loss.item() if smooth_loss is None else 0.98 * smooth_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{smooth_loss:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint()
        if rank == 0 and cfg.eval_every and step % cfg.eval_every == 0:
            scores = problem.evaluate(ema, n_contexts=16, n_samples=32, steps=20)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), file=sys.stderr)
    bar.close()
    seconds_per_step = (train_seconds + time.perf_counter() - start_time) / max(1, step)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return ema.eval(), seconds_per_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=toy_problems.PROBLEMS, help="toy problem (default flatland)")
    parser.add_argument("--model", choices=["dfm", "deterministic", "oracle"], help="what to train (default dfm)")
    for field in dataclasses.fields(Config):
        if field.name not in ("problem", "model"):
            parser.add_argument("--" + field.name.replace("_", "-"), type=field.type, help=f"(default {field.default!r})")
    parser.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint, exactly; "
                        "options given here override the checkpoint's (e.g. --steps to train longer)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    try:
        if args.resume:
            cfg = resolve(dataclasses.replace(load_checkpoint(args.resume)[1], **overrides))
        else:
            cfg = make_config(**overrides)
        _, seconds_per_step = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, RuntimeError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: {cfg.steps} steps, {1000 * seconds_per_step:.1f} ms/step; checkpoint {cfg.out_dir}/ckpt.pt")


if __name__ == "__main__":
    main()
