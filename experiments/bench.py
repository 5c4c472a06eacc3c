"""The benchmark: DFM against its comparison models, with the same budget, on every problem.

    python -m experiments.bench --all --seeds 3 --results assets/results --figures assets   # the 2D toys' results
    python -m experiments.bench --problem scenes3d --results assets/results --figures assets --export notebooks
    python -m experiments.bench --problem scenes3d --weights notebooks --results assets/results --figures assets
    python -m experiments.bench --memory --results assets/results   # the 3D training memory per example
    python -m experiments.bench --speed --seeds 3 --results assets/results   # training speed (on a quiet machine)
    python -m experiments.bench --table assets/results/gp1d.json    # print the table of a results file
    python -m experiments.bench --readme      # rewrite RESULTS.md's tables and README.md's summary from the files

For each problem, seed and model it trains with the problem's default budget (or finishes, or
just loads, the run already in --out), or with --weights loads exported EMA weights; scores the
EMA weights on the held-out contexts of that seed with the problem's evaluate(); and times
training (ms per step, from the run) and sampling (ms per sample, 50 DDIM steps). The models
are DFM, the deterministic model and, on the 2D toys, the oracle (the 3D signal is a field
computed by the networks, not something the data hold, so there is no oracle for it). The 2D
toys also score the EMA weights every --eval-every steps while training: the learning curve.
Everything goes to <--results>/NAME.json (mean and sd over the seeds, the floor, the ratios of
DFM's distances to the other models' computed seed by seed), from which experiments/tables.py
makes the tables of RESULTS.md. The first seed's runs also draw the figures into --figures
(RESULTS.md's, in assets/, are only overwritten with an explicit --figures assets).
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import dfm
import toy_problems
import config
import train
from experiments import tables

KINDS = ["dfm", "deterministic", "oracle"]
ALL = ["gan_inversion", "motion", "flatland", "gp1d"]  # the 2D toys, cheapest first
SCENES3D = ["scenes3d", "scenes3d-64", "scenes3d-128"]


def kinds(name):
    """The models benchmarked on a problem: no oracle for the 3D fields (see the module docstring)."""
    return KINDS[:2] if name in SCENES3D else KINDS


def time_sampling(problem, model, device, n, steps=50):
    """Milliseconds per sample (steps DDIM steps), for a batch of n held-out contexts, one sample each."""
    batch = problem.held_out_batch(n, 0, device)
    start = time.perf_counter()
    dfm.sample_signals(model, batch, 1, generator=0, steps=steps)
    return 1000 * (time.perf_counter() - start) / n


def load_weights(path, cfg):
    """The EMA model of exported weights (--weights) and its training seconds per step, if the file holds the
    run that cfg describes (problem, model, seed)."""
    ckpt, saved = train.load_checkpoint(path)
    if (saved.problem, saved.model, saved.seed) != (cfg.problem, cfg.model, cfg.seed):
        raise ValueError(f"{path} holds problem {saved.problem}, model {saved.model}, seed {saved.seed}; "
                         f"expected {cfg.problem}, {cfg.model}, seed {cfg.seed}")
    model, saved = train.load_ema_model(path, cfg.device)
    return model, ckpt["train_seconds"] / ckpt["step"], saved


def export(path, target):
    """A checkpoint of the EMA weights only, in half precision (no optimizer state, no raw weights), loadable by
    train.load_ema_model, which copies them into the model's float32 weights; it cannot be resumed. Half precision
    halves the files that the repository ships (notebooks/*.pt); the rounding moves the scores by far less than
    their sampling noise (tests/test_bench.py compares them with the results files)."""
    ckpt, _ = train.load_checkpoint(path)
    slim = {k: ckpt[k] for k in ("config", "step", "train_seconds")}
    slim["ema"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    slim["model"] = slim["ema"]  # the same tensors: stored once
    train.save_checkpoint(target, slim)


def run_one(problem, name, kind, seed, args):
    """Train (or reuse, or load with --weights) one run and score it: ({"seed", "scores", "curve"}, model, cfg)."""
    given = {k: v for k, v in (("steps", args.steps), ("eval_every", args.eval_every)) if v is not None}
    cfg = config.make_config(name, model=kind, seed=seed, out_dir=os.path.join(args.out, f"{name}-{kind}-seed{seed}"),
                             **given)
    if args.eval_every is None and cfg.eval_every:  # the 3D problems do not score while training (eval_every 0)
        cfg.eval_every = max(1, cfg.steps // 10)  # ten points on the learning curve
    if args.weights:
        model, seconds_per_step, cfg = load_weights(os.path.join(args.weights, f"{name}-{kind}.pt"), cfg)
        curve = []
    else:
        model, seconds_per_step = train.train_or_resume(cfg, progress=not args.no_progress)
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        curve = torch.load(path, weights_only=True).get("curve", [])
        if args.export and seed == args.seed:
            export(path, os.path.join(args.export, f"{name}-{kind}.pt"))
    evaluate_kwargs = {k: v for k, v in (("n_contexts", args.n_contexts), ("n_samples", args.n_samples),
                                         ("steps", args.sample_steps)) if v is not None}
    if name in SCENES3D and seed == args.seed:  # each context's histogram of sampled back colours
        evaluate_kwargs["histogram_path"] = os.path.join(args.figures, f"{name}-{kind}-histograms.png")
    scores = problem.evaluate(model, seed=seed, **evaluate_kwargs)
    scores["train ms/step"] = 1000 * seconds_per_step
    n_timed = args.n_contexts or (4 if name in SCENES3D else 64)  # a 3D sample takes seconds on a CPU
    scores["sample ms/sample"] = time_sampling(problem, model, cfg.device, n_timed, args.sample_steps or 50)
    print(f"{name}/{kind}, seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    return dict(seed=seed, scores=scores, curve=curve), model, cfg


def draw(problem, name, models, seed, args):
    """The first seed's figures: each model's samples (and a GIF of DFM's where the problem has cameras); for
    the 3D problem DFM's sampled scenes beside the deterministic prediction, as a figure and an orbit."""
    kwargs = {"steps": args.sample_steps} if args.sample_steps else {}
    if name in SCENES3D:
        compare = models["deterministic"]
        problem.plot(models["dfm"], os.path.join(args.figures, f"{name}-samples.png"), seed=seed, compare=compare,
                     **kwargs)
        problem.animate(models["dfm"], os.path.join(args.figures, f"{name}-orbit.gif"), seed=seed, compare=compare,
                        **kwargs)
        return
    for kind, model in models.items():
        problem.plot(model, os.path.join(args.figures, f"{name}-{kind}.png"), seed=seed, **kwargs)
        if kind == "dfm" and hasattr(problem, "animate"):
            problem.animate(model, os.path.join(args.figures, f"{name}-{kind}.gif"), seed=seed, **kwargs)


def mean_sd(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def summarise(runs):
    """Means and sds over the seeds of every score, the floor, and the per-seed ratios of the distances
    (the scores with a floor) of DFM to each other model."""
    columns = list(dict.fromkeys(c for kind in runs for c in runs[kind][0]["scores"] if not c.endswith("_floor")))
    summary = {kind: {c: mean_sd([r["scores"][c] for r in runs[kind]]) for c in columns if c in runs[kind][0]["scores"]}
               for kind in runs}
    floors = [c for c in columns if c + "_floor" in runs["dfm"][0]["scores"]]
    summary["floor"] = {c: mean_sd([r["scores"][c + "_floor"] for r in runs["dfm"]]) for c in floors}
    ratios = {}
    for other in [kind for kind in ("oracle", "deterministic") if kind in runs]:
        ratios[f"dfm/{other}"] = {}
        for c in floors:
            per_seed = [d["scores"][c] / o["scores"][c] for d, o in zip(runs["dfm"], runs[other])]
            ratios[f"dfm/{other}"][c] = {"per_seed": per_seed, **mean_sd(per_seed)}
    return columns, summary, ratios


def bench(name, args):
    problem = toy_problems.load(name)
    start = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {kind: [] for kind in kinds(name)}
    for seed in seeds:
        models = {}
        for kind in kinds(name):
            run, models[kind], cfg = run_one(problem, name, kind, seed, args)
            runs[kind].append(run)
        if seed == args.seed:
            draw(problem, name, models, seed, args)
    columns, summary, ratios = summarise(runs)
    results = dict(
        problem=name, command="python -m experiments.bench " + " ".join(sys.argv[1:]),
        minutes=(time.perf_counter() - start) / 60, machine=tables.machine(),
        # train.train refuses a run in --out with another config or past cfg.steps, so every run has cfg.steps
        settings=dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, eval_every=cfg.eval_every,
                      n_contexts=args.n_contexts, n_samples=args.n_samples, sample_steps=args.sample_steps or 50,
                      curve_eval=train.CURVE_EVAL),
        seeds=seeds, columns=columns, summary=summary, ratios=ratios, runs=runs)
    if hasattr(problem, "benchmark_render"):  # problems rendered by render.py
        results["render rays/s"] = problem.benchmark_render(device=cfg.device)
    path = os.path.join(args.results, f"{name}.json")
    tables.write_json(results, path)
    plot_curves(results, os.path.join(args.figures, f"{name}-curves.png"))
    print(f"\n{tables.results_table(results)}\n(results: {path}; {results['minutes']:.1f} minutes)")


def plot_curves(results, path):
    """Distance to the exact posterior against training step, one panel per distance: each model's mean over
    the seeds (line) and their range (band), with the floor of the same evaluation (dashed)."""
    curves = {kind: [r["curve"] for r in runs] for kind, runs in results["runs"].items()}
    if not all(all(c) for c in curves.values()):
        return  # runs trained with --eval-every 0 (and exported weights) have no curve
    distances = list(next(iter(results["ratios"].values())))
    fig, axes = plt.subplots(1, len(distances), figsize=(4.5 * len(distances), 3.4), squeeze=False)
    for ax, c in zip(axes[0], distances):
        for kind, color in zip(curves, ["tab:red", "tab:gray", "tab:blue"]):
            steps = [point["step"] for point in curves[kind][0]]
            values = torch.tensor([[point[c] for point in curve] for curve in curves[kind]])  # (seeds, points)
            ax.plot(steps, values.mean(0), color=color, label=kind)
            ax.fill_between(steps, values.min(0).values, values.max(0).values, color=color, alpha=0.2, lw=0)
        floor = torch.tensor([[point[c + "_floor"] for point in curve] for curve in curves["dfm"]]).mean(0)
        if (floor > 1e-6).all():  # a floor of 0 up to rounding (motion's off_grid) has no place on a log scale
            ax.plot(steps, floor, color="black", ls="--", label="floor (exact vs exact)")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(c)
    axes[0, 0].set_ylabel("distance to the exact posterior")
    axes[0, 0].legend(fontsize=8)
    e = results["settings"]["curve_eval"]
    fig.suptitle(f"{results['problem']}: learning curves, {len(results['seeds'])} seeds (scored while training on "
                 f"{e['n_contexts']} contexts x {e['n_samples']} samples, {e['steps']} DDIM steps)", fontsize=10)
    fig.tight_layout()
    toy_problems.save_figure(fig, path, dpi=100)


# -----------------------------------------------------------------------------
# Training memory of the 3D settings, and training speed of the 2D toys


def gpu_peak_memory(name, precision):
    """torch.cuda.max_memory_allocated() over one training step of batch 1 on the GPU (with Adam's state and
    the EMA copy that training keeps), in bytes."""
    cfg = config.make_config(name, batch_size=1, precision=precision, device="cuda")
    problem = toy_problems.load(name)
    model = train.build_model(cfg).cuda()
    optimizer = torch.optim.Adam(model.parameters())
    ema = [p.detach().clone() for p in model.parameters()]  # noqa: F841 (held, as training holds it)
    batch = problem.sample_batch(1, torch.Generator().manual_seed(0), "cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(batch)
    loss.backward()
    optimizer.step()
    return torch.cuda.max_memory_allocated()


def training_memory(name, precision):
    """The training memory of one example (batch 1) of a 3D setting, in bytes: counted
    (scenes3d_eval.memory_per_sample: weights, gradients, Adam, EMA and what autograd saves, the same on any
    device) and, with a GPU, measured there (gpu_peak, else None)."""
    from toy_problems import scenes3d_eval
    counted = scenes3d_eval.memory_per_sample(name, precision)
    return {**counted, "gpu_peak": gpu_peak_memory(name, precision) if torch.cuda.is_available() else None}


def measure_memory(args):
    """training_memory of the GPU settings in both precisions, written to <--results>/memory3d.json."""
    from toy_problems import scenes3d
    rows = []
    for name in config.GPU_SETTINGS:
        size = scenes3d.SETTINGS[name].world.size
        for precision in ("fp32", "bf16"):
            rows.append(dict(problem=name, image=f"{size}x{size}", precision=precision,
                             **training_memory(name, precision)))
            print(f"{name}, {precision}: {rows[-1]['total'] / 2 ** 30:.3f} GiB counted", flush=True)
    results = dict(problem="memory3d", command="python -m experiments.bench " + " ".join(sys.argv[1:]),
                   machine=tables.machine(), rows=rows)
    path = os.path.join(args.results, "memory3d.json")
    tables.write_json(results, path)
    print(f"\n{tables.memory_table(results)}\n(results: {path})")


SPEED_PROBLEMS = ALL + ["scenes3d"]  # the problems --speed times: every CPU-sized one
SPEED_SETTINGS = [  # (label, environment): OpenMP's wait policy must be set before torch loads, hence processes
    ("2 threads, ACTIVE (the default on an idle machine)", {"OMP_WAIT_POLICY": "ACTIVE"}),
    ("2 threads, PASSIVE (the default on a busy one)", {"OMP_WAIT_POLICY": "PASSIVE"}),
    (tables.ONE_THREAD, {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}),
]


def train_ms_per_step(name, steps, environment):
    """ms per DFM training step at the problem's default batch, from `python train.py` in a fresh process."""
    with tempfile.TemporaryDirectory() as out_dir:
        command = [sys.executable, "train.py", "--problem", name, "--steps", str(steps), "--eval-every", "0",
                   "--out-dir", os.path.join(out_dir, "run"), "--no-progress"]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        done = subprocess.run(command, env={**env, **environment}, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    found = re.search(r"done: \d+ steps, ([\d.]+) ms/step", done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return float(found.group(1))


def measure_speed(args):
    """Every CPU-sized problem's training speed under each of SPEED_SETTINGS, --seeds repetitions taken in rotation
    (so a change in the machine's load touches every setting alike), with the load average before and after."""
    steps = args.steps or 100
    load_before = list(os.getloadavg())
    times = {name: {label: [] for label, _ in SPEED_SETTINGS} for name in SPEED_PROBLEMS}
    for _ in range(args.seeds):
        for name in SPEED_PROBLEMS:
            for label, environment in SPEED_SETTINGS:
                times[name][label].append(train_ms_per_step(name, steps, environment))
                print(f"{name}, {label}: {times[name][label][-1]:.1f} ms/step", flush=True)
    defaults = {name: config.make_config(name) for name in SPEED_PROBLEMS}
    results = dict(problem="speed", command="python -m experiments.bench " + " ".join(sys.argv[1:]), steps=steps,
                   repetitions=args.seeds, machine=tables.machine(),
                   load_average_before=load_before, load_average_after=list(os.getloadavg()),
                   defaults={name: dict(steps=c.steps, batch_size=c.batch_size) for name, c in defaults.items()},
                   ms_per_step=times)
    path = os.path.join(args.results, "speed.json")
    tables.write_json(results, path)
    print(f"\n{tables.speed_table(results)}\n(results: {path})")


def check_options(args):
    """One line naming the option, before any work, for options that cannot work together."""
    if args.seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {args.seeds}")
    if args.weights:
        given = [f"--{k.replace('_', '-')}" for k in ("steps", "eval_every", "export") if getattr(args, k) is not None]
        if given or args.seeds != 1:
            raise ValueError(f"--weights scores exported weights, one run per model: it takes no "
                             f"{', '.join(given) or '--seeds other than 1'}")
        for name in ALL if args.all else args.problem:
            for kind in kinds(name):
                path = os.path.join(args.weights, f"{name}-{kind}.pt")
                if not os.path.isfile(path):
                    raise ValueError(f"--weights {args.weights}: no {path} (written by --export)")


def main():
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--problem", nargs="+", default=["gp1d"], choices=toy_problems.PROBLEMS, metavar="PROBLEM",
                        help="problems to benchmark, one after another: "
                             f"{', '.join(toy_problems.PROBLEMS)} (default: gp1d)")
    parser.add_argument("--all", action="store_true", help=f"every 2D toy, cheapest first: {', '.join(ALL)} "
                        "(default: only --problem)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per model: --seed, --seed + 1, ...; each seed "
                        "trains its own runs and scores its own held-out contexts (default: 1)")
    parser.add_argument("--steps", type=int, help="training steps per model (default: the problem's, "
                        "as in train.py --help)")
    parser.add_argument("--eval-every", type=int, help="steps between the scores of the learning curve, 0 = none "
                        "(default: a tenth of the steps; none for the 3D problems)")
    parser.add_argument("--n-contexts", type=int, help="held-out contexts of the final scores "
                        "(default: the problem's evaluate())")
    parser.add_argument("--n-samples", type=int, help="samples per context of the final scores "
                        "(default: the problem's evaluate())")
    parser.add_argument("--sample-steps", type=int, help="DDIM steps of the final scores and figures (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="first seed of training and of the held-out contexts, "
                        "in [0, 2^30) (default: 0)")
    parser.add_argument("--out", default=os.path.join("out", "bench"), help="folder for the runs' checkpoints, "
                        "one subfolder per problem, model and seed; runs found there are finished or reused "
                        "(default: out/bench)")
    parser.add_argument("--weights", metavar="DIR", help="score the exported EMA weights DIR/<problem>-<model>.pt "
                        "instead of training (they hold no optimizer state, so they cannot be resumed) "
                        "(default: train)")
    parser.add_argument("--export", metavar="DIR", help="also save the first seed's EMA weights, small enough to "
                        "commit, as DIR/<problem>-<model>.pt (the 3D notebook loads notebooks/scenes3d-*.pt) "
                        "(default: none)")
    parser.add_argument("--results", help="folder for the results files NAME.json (default: <--out>/results; "
                        "with --readme: assets/results)")
    parser.add_argument("--figures", help="folder for the figures (default: <--out>/figures; "
                        "--figures assets refreshes RESULTS.md's)")
    parser.add_argument("--table", metavar="JSON", help="only print the markdown table of this results file "
                        "(default: benchmark)")
    parser.add_argument("--readme", action="store_true", help="only rewrite the generated blocks of RESULTS.md "
                        "and README.md from the results files in --results and the studies' in assets/studies "
                        "(default: benchmark)")
    parser.add_argument("--memory", action="store_true", help="only count the training memory of one example of "
                        "the 3D GPU settings (and measure it, with a GPU) and write <--results>/memory3d.json "
                        "(default: benchmark)")
    parser.add_argument("--speed", action="store_true", help="only time 100 training steps (or --steps) of every "
                        "toy's DFM under each thread setting, --seeds times, and write <--results>/speed.json; "
                        "run it on a quiet machine (default: benchmark)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (default: show them)")
    args = parser.parse_args()
    # a bad option or file, or a run in --out that does not match: one line; Ctrl-C: training saved its checkpoint
    with toy_problems.one_line_exit():
        if args.table:
            print(tables.table_of(args.table))
            return
        if args.readme:
            tables.rewrite(args.results or os.path.join("assets", "results"))
            return
        args.figures = args.figures or os.path.join(args.out, "figures")
        args.results = args.results or os.path.join(args.out, "results")
        if args.memory:
            measure_memory(args)
            return
        if args.speed:
            measure_speed(args)
            return
        check_options(args)
        m = tables.machine()
        print(f"machine: {m['cpu']}, {m['cpus']} cpus, torch {m['torch']} ({m['threads']} threads), "
              f"device {m['device']}", flush=True)
        for name in ALL if args.all else args.problem:
            bench(name, args)


if __name__ == "__main__":
    main()
