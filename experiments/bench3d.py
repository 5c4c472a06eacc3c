"""The 3D benchmark: DFM against the deterministic model, with the same budget, on scenes3d.

    python -m experiments.bench3d                          # train (or reuse) both in out/bench3d, score, time, memory
    python -m experiments.bench3d --memory-only            # just the memory per sample at 64x64 and 128x128
    python -m experiments.bench3d --figures assets         # also refresh the README's figures (tracked in git)
    python -m experiments.diagnose3d out/bench3d/scenes3d-dfm/ckpt.pt   # why the samples do (or don't) commit

For each model it trains with the problem's default budget (or finishes, or loads, the run
already in --out), scores the EMA weights on held-out contexts (toy_problems/scenes3d_eval.py
says what each score means), and times training (ms per step, from the run) and sampling
(seconds per scene, 50 DDIM steps). Then it counts the training memory of one example (batch
1) of the GPU settings at 64x64 and 128x128: weights, gradients, Adam and EMA plus every tensor
autograd saves for the backward pass, which is the same on any device; with a GPU it also runs
one such step there and prints torch.cuda.max_memory_allocated() beside it. There is no oracle
for this problem: the signal is a field computed by the networks, not something the data hold.
"""
import argparse
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep, not spin: fast on a busy machine (README, Speed)

import torch

import toy_problems
import config
import train
from toy_problems import scenes3d_eval

KINDS = ["dfm", "deterministic"]
SCORES = ["back_tv", "sharp", "consistent", "views", "psnr_context", "ssim_context", "lpips_context", "psnr_near"]


def time_sampling(model, setting, device, n=4, steps=50):
    """Seconds per sampled scene (50 DDIM steps), for a batch of n contexts."""
    from toy_problems import scenes3d
    batch = scenes3d.held_out_batch(n, 0, device, setting)
    start = time.perf_counter()
    scenes3d_eval.sample_scenes(model, batch, 1, torch.Generator(device=device).manual_seed(0), steps)
    return (time.perf_counter() - start) / n


def export(path, target):
    """A checkpoint of the EMA weights only (no optimizer state, no raw weights), loadable by train.load_ema_model."""
    ckpt, _ = train.load_checkpoint(path)
    slim = {k: ckpt[k] for k in ("config", "ema", "step", "train_seconds")}
    slim["model"] = slim["ema"]  # the same tensors: stored once
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    train.save_checkpoint(target, slim)


def gpu_peak_memory(name, precision):
    """torch.cuda.max_memory_allocated() over one training step of batch 1 on the GPU, in bytes."""
    cfg = config.make_config(name, batch_size=1, precision=precision, device="cuda")
    problem = toy_problems.load(name)
    model = train.build_model(cfg).cuda()
    optimizer = torch.optim.Adam(model.parameters())
    ema = [p.detach().clone() for p in model.parameters()]  # the EMA copy that training keeps
    batch = problem.sample_batch(1, torch.Generator().manual_seed(0), "cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(batch)
    loss.backward()
    optimizer.step()
    del ema
    return torch.cuda.max_memory_allocated()


def memory_table():
    gib = 2 ** 30
    print("\nTraining memory of one example (batch 1): weights + gradients + Adam + EMA, and what autograd saves")
    print("| problem | image | precision | weights etc. (GiB) | saved activations (GiB) | total (GiB) | GPU peak (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for name in ("scenes3d-64", "scenes3d-128"):
        size = toy_problems.load(name).SETTING.world.size
        for precision in ("fp32", "bf16"):
            m = scenes3d_eval.memory_per_sample(name, precision)
            peak = f"{gpu_peak_memory(name, precision) / gib:.2f}" if torch.cuda.is_available() else "no GPU here"
            print(f"| {name} | {size}x{size} | {precision} | {m['weights'] / gib:.3f} | {m['activations'] / gib:.3f} "
                  f"| {m['total'] / gib:.3f} | {peak} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--problem", default="scenes3d", choices=["scenes3d", "scenes3d-64", "scenes3d-128"],
                        help="which 3D setting to train and score (default: scenes3d, 32x32 for a CPU)")
    parser.add_argument("--steps", type=int, help="training steps per model (default: the problem's, 2000 for scenes3d)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and evaluation (default 0)")
    parser.add_argument("--n-contexts", type=int, default=8, help="held-out contexts to score (default 8)")
    parser.add_argument("--n-samples", type=int, default=16, help="sampled scenes per context (default 16)")
    parser.add_argument("--out", default=os.path.join("out", "bench3d"), help="checkpoints go here (default out/bench3d)")
    parser.add_argument("--figures", default=os.path.join("out", "bench3d", "figures"),
                        help="figures go here (default out/bench3d/figures; the README's are in assets/)")
    parser.add_argument("--memory-only", action="store_true", help="only print the memory table")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table (it takes minutes on a CPU)")
    parser.add_argument("--export", metavar="DIR", help="also save each model's EMA weights, small enough to commit, "
                        "as DIR/<problem>-<model>.pt (the 3D notebook loads notebooks/scenes3d-*.pt)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device}", flush=True)
    if not args.memory_only:
        rows, models = {}, {}
        for kind in KINDS:
            cfg = config.make_config(args.problem, model=kind, seed=args.seed, eval_every=0,
                                    out_dir=os.path.join(args.out, f"{args.problem}-{kind}"),
                                    **({"steps": args.steps} if args.steps is not None else {}))
            path = os.path.join(cfg.out_dir, "ckpt.pt")
            model, seconds_per_step = train.train(cfg, resume=path if os.path.exists(path) else None,
                                                  progress=not args.no_progress)
            setting = model.denoiser.setting
            os.makedirs(args.figures, exist_ok=True)
            histograms = os.path.join(args.figures, f"{args.problem}-{kind}-histograms.png")
            scores = scenes3d_eval.evaluate(model, seed=args.seed, n_contexts=args.n_contexts, n_samples=args.n_samples,
                                            histogram_path=histograms)
            scores["train ms/step"] = 1000 * seconds_per_step
            scores["sample s/scene"] = time_sampling(model, setting, cfg.device)
            rows[kind], models[kind] = scores, model
            if args.export:
                export(path, os.path.join(args.export, f"{args.problem}-{kind}.pt"))
            print(f"{kind}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
        scenes3d_eval.plot(models["dfm"], os.path.join(args.figures, f"{args.problem}-samples.png"), seed=args.seed,
                           compare=models["deterministic"])
        scenes3d_eval.animate(models["dfm"], os.path.join(args.figures, f"{args.problem}-orbit.gif"), seed=args.seed,
                              compare=models["deterministic"])
        columns = SCORES + ["train ms/step", "sample s/scene"]
        print(f"\n{args.problem}: {cfg.steps} steps x batch {cfg.batch_size} per model, seed {args.seed}, "
              f"{args.n_contexts} held-out contexts x {args.n_samples} samples")
        print("| model | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for kind, scores in rows.items():
            print(f"| {kind} | " + " | ".join(f"{scores[c]:.4f}" for c in columns) + " |")
        floor = {"back_tv": rows["dfm"]["back_tv_floor"], "views": rows["dfm"]["views_floor"]}
        print("| floor (exact vs exact) | " + " | ".join(f"{floor[c]:.4f}" if c in floor else "-" for c in columns) + " |")
        _, message = scenes3d_eval.metrics.load_lpips()
        print(f"LPIPS: {message}")
    if not args.no_memory:
        memory_table()


if __name__ == "__main__":
    main()
