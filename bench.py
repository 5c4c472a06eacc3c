"""The benchmark: DFM against its two comparison models, with the same budget, on a toy problem.

    python bench.py                          # the 1D toy
    python bench.py --problem gp1d flatland  # several problems, one after another
    python bench.py --figures assets         # also refresh the README's figures (tracked in git)

For each model (dfm, deterministic, oracle) it trains with the problem's default budget
(or finishes, or just loads, the run already in --out; training time is then that run's),
scores the EMA weights against the exact posterior on held-out contexts, and times
training (ms per step) and sampling (ms per sample, 50 DDIM steps). It prints one markdown
table per problem, with the floor (two exact sample sets scored against each other), and
saves a figure per model in --figures (out/bench/figures by default; the README's figures in
assets/ are only overwritten with an explicit --figures assets).
"""
import argparse
import os
import platform
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep, not spin: fast on a busy machine (README, Speed)

import torch

import dfm
import toy_problems
import config
import train

KINDS = ["dfm", "deterministic", "oracle"]


def time_sampling(problem, model, device, n=64, steps=50):
    """Milliseconds per sample for a batch of n contexts."""
    batch = problem.held_out_batch(n, 0, device)
    start = time.perf_counter()
    dfm.sample_signals(model, batch, 1, generator=0, steps=steps)
    return 1000 * (time.perf_counter() - start) / n


def bench(name, args):
    problem = toy_problems.load(name)
    rows = {}
    for kind in KINDS:
        cfg = config.make_config(name, model=kind, seed=args.seed, eval_every=0,
                                out_dir=os.path.join(args.out, f"{name}-{kind}"),
                                **({"steps": args.steps} if args.steps is not None else {}))
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        resume = path if os.path.exists(path) else None  # finish (or just load) an earlier run of the same config
        model, seconds_per_step = train.train(cfg, resume=resume, progress=not args.no_progress)
        scores = problem.evaluate(model, seed=args.seed)
        scores["train ms/step"] = 1000 * seconds_per_step
        scores["sample ms/sample"] = time_sampling(problem, model, cfg.device)
        rows[kind] = scores
        os.makedirs(args.figures, exist_ok=True)
        problem.plot(model, os.path.join(args.figures, f"{name}-{kind}.png"), seed=args.seed)
        if kind == "dfm" and hasattr(problem, "animate"):  # problems with cameras get a GIF of one sample
            problem.animate(model, os.path.join(args.figures, f"{name}-{kind}.gif"), seed=args.seed)
    columns = [c for c in rows["dfm"] if not c.endswith("_floor")]
    # train.train refuses a run in --out with another config or past cfg.steps, so every model has cfg.steps
    print(f"\n{name}: {cfg.steps} steps x batch {cfg.batch_size} per model, seed {args.seed}; "
          f"distances to the exact posterior, lower is better")
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for kind, scores in rows.items():
        print(f"| {kind} | " + " | ".join(f"{scores[c]:.4f}" if c in scores else "-" for c in columns) + " |")
    floor = rows["dfm"]
    print("| floor (exact vs exact) | " + " | ".join(f"{floor[c + '_floor']:.4f}" if c + "_floor" in floor else "-"
                                                    for c in columns) + " |")
    if hasattr(problem, "benchmark_render"):  # problems rendered by render.py
        print(f"render.py throughput (forward + backward): {problem.benchmark_render(device=cfg.device):,.0f} rays/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--problem", nargs="+", default=["gp1d"], choices=toy_problems.PROBLEMS, metavar="PROBLEM",
                        help="toy problems to benchmark, one after another: "
                             f"{', '.join(toy_problems.PROBLEMS)} (default: gp1d)")
    parser.add_argument("--steps", type=int, help="training steps per model (default: the problem's, "
                        "as in train.py --help)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and of the held-out contexts, "
                        "in [0, 2^20) (default: 0)")
    parser.add_argument("--out", default=os.path.join("out", "bench"), help="folder for the runs' checkpoints, "
                        "one subfolder per problem and model; runs found there are finished or reused "
                        "(default: out/bench)")
    parser.add_argument("--figures", help="folder for the figures (default: out/bench/figures, i.e. <--out>/figures; "
                        "--figures assets refreshes the README's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (default: show them)")
    args = parser.parse_args()
    args.figures = args.figures or os.path.join(args.out, "figures")
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device}")
    try:
        for name in args.problem:
            bench(name, args)
    except (ValueError, FileNotFoundError) as e:  # a bad option, or a run in --out that does not match
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
