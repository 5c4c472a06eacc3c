"""The GPU figures of the 3D model in one short run (at most about 8 minutes on one GPU).

    python -m experiments.gpu_check                                    # on a machine with a GPU: scenes3d-64, bf16
    python -m experiments.gpu_check --problem scenes3d --device cpu --steps 2 --batch-size 2   # tiny, on a CPU

It prints three things:
1. memory: torch.cuda.max_memory_allocated() over one bf16 training step at batch 1, beside the
   figure counted from what autograd saves (experiments.bench.training_memory, as in the memory
   table; the count is the same on any device, and on a CPU it is all that is printed);
2. speed: steps per second of a short bf16 training at the problem's default batch (train.py's
   own loop, its first step not counted);
3. DDP: one training step under `torchrun --nproc_per_node=1`, which uses NCCL on a GPU (gloo on a CPU).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

import config
import train
from experiments import bench


def main():
    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--problem", default="scenes3d-64", choices=["scenes3d", "scenes3d-64", "scenes3d-128"],
                        help="the 3D setting to measure (default scenes3d-64)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a tiny check of the script itself")
    parser.add_argument("--steps", type=int, default=30, help="training steps timed for the speed (default 30)")
    parser.add_argument("--batch-size", type=int, help="batch of the speed run (default: the problem's)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU here: use --device cpu for a tiny check")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (the first step is not timed), got {args.steps}")
    gpu = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"{args.problem} on {name}, torch {torch.__version__}", flush=True)

    gib, memory = 2 ** 30, bench.training_memory(args.problem, "bf16")
    peak = "no GPU" if memory["gpu_peak"] is None else f"{memory['gpu_peak'] / gib:.3f} GiB"
    print(f"1. memory per example (batch 1, bf16): GPU peak {peak}, counted {memory['total'] / gib:.3f} GiB",
          flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        extra = {"batch_size": args.batch_size} if args.batch_size else {}
        cfg = config.make_config(args.problem, steps=1, precision="bf16", device=args.device, eval_every=0,
                                 ckpt_every=10 ** 6, out_dir=os.path.join(tmp, "speed"), **extra)
        train.train_or_resume(cfg, progress=False)  # the first step: allocations, kernel selection
        cfg.steps = args.steps
        start = time.perf_counter()
        train.train_or_resume(cfg, progress=False)  # the same run, resumed
        per_step = (time.perf_counter() - start) / (args.steps - 1)
        print(f"2. speed: {1 / per_step:.2f} steps/s at batch {cfg.batch_size} (bf16, {args.steps - 1} steps, "
              f"{1000 * per_step:.0f} ms/step)", flush=True)

        command = ["torchrun", "--nproc_per_node=1", "train.py", "--problem", args.problem, "--steps", "1",
                   "--batch-size", str(cfg.batch_size), "--device", args.device, "--precision", "bf16",
                   "--out-dir", os.path.join(tmp, "ddp"), "--no-progress"]
        start = time.perf_counter()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        run = subprocess.run(command, capture_output=True, text=True, cwd=root, env={**os.environ, "TMPDIR": tmp})
        backend = "NCCL" if gpu else "gloo"
        result = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode}):\n{run.stderr[-2000:]}"
        print(f"3. one DDP step under torchrun --nproc_per_node=1 ({backend}): {result}, "
              f"{time.perf_counter() - start:.1f} s with start-up", flush=True)
        if run.returncode != 0:
            sys.exit(1)


if __name__ == "__main__":
    main()
