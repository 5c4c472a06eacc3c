"""Draw samples from a trained checkpoint, score them against the exact posterior, save a figure.

    python sample.py out/flatland-dfm/ckpt.pt
    python sample.py out/gp1d-dfm/ckpt.pt --n-samples 128 --steps 100 --seed 1

Scores are distances between the model's samples and exact posterior samples for held-out
contexts (lower is better); each "_floor" is the same distance between two independent
exact sample sets of the same size, the best any model can score.
"""
import argparse
import os
import sys

import torch

import toy_problems
import train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a ckpt.pt written by train.py")
    parser.add_argument("--seed", type=int, default=0, help="picks the held-out contexts and the sampling noise")
    parser.add_argument("--n-contexts", type=int, default=64, help="held-out contexts to score on")
    parser.add_argument("--n-samples", type=int, default=64, help="samples per context")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per sample")
    parser.add_argument("--figure", help="where to save the PNG (default: samples.png beside the checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    try:
        model, cfg = train.load_ema_model(args.checkpoint, args.device)
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    problem = toy_problems.load(cfg.problem)
    scores = problem.evaluate(model, seed=args.seed, n_contexts=args.n_contexts,
                              n_samples=args.n_samples, steps=args.steps)
    print(f"{cfg.problem} / {cfg.model}, {args.n_contexts} held-out contexts x {args.n_samples} samples:")
    for name, value in scores.items():
        print(f"  {name:>24s}  {value:.4f}")
    figure = args.figure or os.path.join(os.path.dirname(args.checkpoint), "samples.png")
    problem.plot(model, figure, seed=args.seed)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
