"""The benchmark: DFM against its two comparison models, with the same budget, on the toy problems.

    python -m experiments.bench --all --seeds 3 --results assets/results --figures assets   # the README's results
    python -m experiments.bench --problem gp1d flatland     # some problems, one seed, figures in out/bench/figures
    python -m experiments.bench --table assets/results/gp1d.json   # print the README table of a results file
    python -m experiments.bench --readme                    # rewrite README.md's result tables from assets/results
    python -m experiments.bench --speed --results assets/results   # the README's Speed table (run it on a quiet machine)

For each problem, seed and model (dfm, deterministic, oracle) it trains with the problem's
default budget (or finishes, or just loads, the run already in --out), scoring the EMA
weights against the exact posterior every --eval-every steps as it trains (the learning
curve, kept in the checkpoint); then it scores the final EMA weights on the held-out contexts
of that seed and times training (ms per step) and sampling (ms per sample, 50 DDIM steps).
It prints one markdown table per problem (mean and sd over the seeds, the floor, and the
ratios DFM/oracle and DFM/deterministic computed seed by seed) and writes everything to
<--results>/NAME.json, from which the README's tables and learning-curve figures are made.
The first seed's runs also draw a figure per model in --figures (the README's figures in
assets/ are only overwritten with an explicit --figures assets).
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep, not spin: fast on a busy machine (README, Speed)

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import dfm
import toy_problems
import config
import train

KINDS = ["dfm", "deterministic", "oracle"]
ALL = ["gan_inversion", "motion", "flatland", "gp1d"]  # the 2D toys, cheapest first (experiments/bench3d.py has the 3D one)
TIMINGS = ["train ms/step", "sample ms/sample"]


def time_sampling(problem, model, device, n=64, steps=50):
    """Milliseconds per sample for a batch of n contexts."""
    batch = problem.held_out_batch(n, 0, device)
    start = time.perf_counter()
    dfm.sample_signals(model, batch, 1, generator=0, steps=steps)
    return 1000 * (time.perf_counter() - start) / n


def run_one(problem, name, kind, seed, args):
    """Train (or reuse) one run and score it: {"seed", "scores", "curve", "load_average"}."""
    cfg = config.make_config(name, model=kind, seed=seed, out_dir=os.path.join(args.out, f"{name}-{kind}-seed{seed}"),
                             **{k: v for k, v in (("steps", args.steps), ("eval_every", args.eval_every)) if v is not None})
    if args.eval_every is None:
        cfg.eval_every = max(1, cfg.steps // 10)  # ten points on the learning curve
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume = path if os.path.exists(path) else None  # finish (or just load) an earlier run of the same config
    model, seconds_per_step = train.train(cfg, resume=resume, progress=not args.no_progress)
    curve = torch.load(path, weights_only=True).get("curve", [])
    evaluate_kwargs = {k: v for k, v in (("n_contexts", args.n_contexts), ("n_samples", args.n_samples),
                                         ("steps", args.sample_steps)) if v is not None}
    scores = problem.evaluate(model, seed=seed, **evaluate_kwargs)
    scores["train ms/step"] = 1000 * seconds_per_step
    scores["sample ms/sample"] = time_sampling(problem, model, cfg.device, n=args.n_contexts or 64,
                                               steps=args.sample_steps or 50)
    if seed == args.seed:
        plot_kwargs = {"steps": args.sample_steps} if args.sample_steps else {}
        os.makedirs(args.figures, exist_ok=True)
        problem.plot(model, os.path.join(args.figures, f"{name}-{kind}.png"), seed=seed, **plot_kwargs)
        if kind == "dfm" and hasattr(problem, "animate"):  # problems with cameras get a GIF of one sample
            problem.animate(model, os.path.join(args.figures, f"{name}-{kind}.gif"), seed=seed, **plot_kwargs)
    return dict(seed=seed, scores=scores, curve=curve, load_average=list(os.getloadavg())), cfg


def write_json(results, path):
    """Write results to path atomically (write, then rename): a killed run leaves the last results whole."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def machine():
    """What made a results file: CPU, cores, threads, device, torch and Python versions."""
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(cpu=platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads(), device=device,
                torch=torch.__version__, python=platform.python_version())


def mean_sd(values):
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def summarise(runs):
    """Means and sds over the seeds of every score, the floor, and the per-seed ratios of the distances
    (the scores with a floor) of DFM to the oracle and to the deterministic model."""
    columns = list(dict.fromkeys(c for kind in KINDS for c in runs[kind][0]["scores"] if not c.endswith("_floor")))
    summary = {kind: {c: mean_sd([r["scores"][c] for r in runs[kind]]) for c in columns if c in runs[kind][0]["scores"]}
               for kind in KINDS}
    floors = [c for c in columns if c + "_floor" in runs["dfm"][0]["scores"]]
    summary["floor"] = {c: mean_sd([r["scores"][c + "_floor"] for r in runs["dfm"]]) for c in floors}
    ratios = {}
    for other in ("oracle", "deterministic"):
        ratios[f"dfm/{other}"] = {}
        for c in floors:
            per_seed = [d["scores"][c] / o["scores"][c] for d, o in zip(runs["dfm"], runs[other])]
            ratios[f"dfm/{other}"][c] = {"per_seed": per_seed, **mean_sd(per_seed)}
    return columns, summary, ratios


def bench(name, args):
    problem = toy_problems.load(name)
    start = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {kind: [] for kind in KINDS}
    for seed in seeds:
        for kind in KINDS:
            run, cfg = run_one(problem, name, kind, seed, args)
            runs[kind].append(run)
    columns, summary, ratios = summarise(runs)
    results = dict(
        problem=name, command="python -m experiments.bench " + " ".join(sys.argv[1:]), minutes=(time.perf_counter() - start) / 60,
        machine=machine(),
        # train.train refuses a run in --out with another config or past cfg.steps, so every run has cfg.steps
        settings=dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, eval_every=cfg.eval_every,
                      n_contexts=args.n_contexts, n_samples=args.n_samples, sample_steps=args.sample_steps or 50,
                      curve_eval=train.CURVE_EVAL),
        seeds=seeds, columns=columns, summary=summary, ratios=ratios, runs=runs)
    if hasattr(problem, "benchmark_render"):  # problems rendered by render.py
        results["render rays/s"] = problem.benchmark_render(device=cfg.device)
    path = os.path.join(args.results, f"{name}.json")
    write_json(results, path)
    plot_curves(results, os.path.join(args.figures, f"{name}-curves.png"))
    print(f"\n{results_table(results)}\n(results: {path}; {results['minutes']:.1f} minutes)")


# -----------------------------------------------------------------------------
# Speed: the README's training command, timed in fresh processes

SPEED_SETTINGS = [  # (label, environment): OpenMP's wait policy must be set before torch loads, hence processes
    ("2 threads, passive (default)", {}),
    ("2 threads, OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}),
    ("1 thread", {"OMP_NUM_THREADS": "1"}),
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
    """Every toy's training speed under each of SPEED_SETTINGS, --seeds repetitions taken in rotation (so a
    change in the machine's load touches every setting alike), with the load average before and after."""
    steps = args.steps or 100
    load_before = list(os.getloadavg())
    times = {name: {label: [] for label, _ in SPEED_SETTINGS} for name in ALL}
    for _ in range(args.seeds):
        for name in ALL:
            for label, environment in SPEED_SETTINGS:
                times[name][label].append(train_ms_per_step(name, steps, environment))
                print(f"{name}, {label}: {times[name][label][-1]:.1f} ms/step", flush=True)
    defaults = {name: config.make_config(name) for name in ALL}
    results = dict(problem="speed", command="python -m experiments.bench " + " ".join(sys.argv[1:]), steps=steps,
                   repetitions=args.seeds, machine=machine(),
                   load_average_before=load_before, load_average_after=list(os.getloadavg()),
                   defaults={name: dict(steps=c.steps, batch_size=c.batch_size) for name, c in defaults.items()},
                   ms_per_step=times)
    path = os.path.join(args.results, "speed.json")
    write_json(results, path)
    print(f"\n{speed_table(results)}\n(results: {path})")


def speed_table(results):
    """The README's Speed table: the median (and range) of each setting's repetitions, and the default budget's
    training time at the default setting."""
    m, labels = results["machine"], [label for label, _ in SPEED_SETTINGS]
    before, after = (", ".join(f"{x:.2f}" for x in results[k]) for k in ("load_average_before", "load_average_after"))
    lines = [f"ms per DFM training step, median (min-max) of {results['repetitions']} runs of {results['steps']} "
             f"steps each; {m['cpu']}, {m['cpus']} cpus, torch {m['torch']}; load average (1, 5, 15 min) "
             f"{before} before, {after} after", "",
             "| problem | " + " | ".join(labels) + " | default steps x batch | default training time |",
             "|---" * (len(labels) + 3) + "|"]
    for name, by_label in results["ms_per_step"].items():
        d = results["defaults"][name]
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in by_label.values()]
        minutes = statistics.median(by_label[labels[0]]) * d["steps"] / 60000
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {d['steps']} x {d['batch_size']} | "
                     f"{minutes:.1f} min |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Results files -> README tables and learning-curve figures


def cell(stat, digits):
    if stat is None:
        return "-"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat["sd"] is not None else "")


def results_table(results):
    """The markdown of a results file: a header line, the scores (mean ± sd over the seeds) with the floor,
    and the ratios of DFM's distances to the other models', computed seed by seed."""
    columns, summary, s, m = results["columns"], results["summary"], results["settings"], results["machine"]
    lines = [f"{results['problem']}: {s['steps']} steps x batch {s['batch_size']} per model, "
             f"seeds {', '.join(map(str, results['seeds']))} (mean ± sd over seeds); distances to the exact "
             f"posterior, lower is better; {m['cpu']}, {m['cpus']} cpus, {m['threads']} thread(s), device "
             f"{m['device']}, torch {m['torch']}", "",
             "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, label in [(k, k) for k in KINDS] + [("floor", "floor (exact vs exact)")]:
        digits = lambda c: 1 if c in TIMINGS else 4  # noqa: E731
        lines.append(f"| {label} | " + " | ".join(cell(summary[row].get(c), digits(c)) for c in columns) + " |")
    distances = list(next(iter(results["ratios"].values())))
    lines += ["", "| ratio, seed by seed | " + " | ".join(distances) + " |", "|---" * (len(distances) + 1) + "|"]
    for ratio, by_column in results["ratios"].items():
        lines.append(f"| {ratio.replace('/', ' / ')} | " + " | ".join(cell(by_column[c], 2) for c in distances) + " |")
    return "\n".join(lines)


def any_table(results):
    """The table of a results file: the Speed table's, or a toy's."""
    return speed_table(results) if results["problem"] == "speed" else results_table(results)


BLOCK = re.compile(r"(<!-- results (\w+)[^>]*-->\n)(.*?)(<!-- /results -->)", re.S)
STUDY_BLOCK = re.compile(r"(<!-- study (\w+)[^>]*-->\n)(.*?)(<!-- /study -->)", re.S)


def readme_with_tables(text, results_dir, studies_dir=os.path.join("assets", "studies")):
    """The README's text with every block between `<!-- results NAME ... -->` and `<!-- /results -->`
    replaced by the table of results_dir/NAME.json, and every block between `<!-- study NAME ... -->` and
    `<!-- /study -->` by the tables of experiments/study.py's studies_dir/NAME.json."""
    def table(match):
        with open(os.path.join(results_dir, f"{match.group(2)}.json")) as f:
            results = json.load(f)
        return match.group(1) + any_table(results) + "\n" + match.group(4)

    def study_table(match):
        from experiments import study
        with open(os.path.join(studies_dir, f"{match.group(2)}.json")) as f:
            rows = json.load(f)["rows"]
        return match.group(1) + study.table(rows, study.STUDIES[match.group(2)][1]).strip() + "\n" + match.group(4)
    return STUDY_BLOCK.sub(study_table, BLOCK.sub(table, text))


def plot_curves(results, path):
    """Distance to the exact posterior against training step, one panel per distance: each model's mean over
    the seeds (line) and their range (band), with the floor of the same evaluation (dashed)."""
    curves = {kind: [r["curve"] for r in results["runs"][kind]] for kind in KINDS}
    if not all(all(curves[kind]) for kind in KINDS):
        return  # a run trained with --eval-every 0 has no curve
    distances = list(next(iter(results["ratios"].values())))
    fig, axes = plt.subplots(1, len(distances), figsize=(4.5 * len(distances), 3.4), squeeze=False)
    for ax, c in zip(axes[0], distances):
        for kind, color in zip(KINDS, ["tab:red", "tab:gray", "tab:blue"]):
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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--problem", nargs="+", default=["gp1d"], choices=toy_problems.PROBLEMS, metavar="PROBLEM",
                        help="toy problems to benchmark, one after another: "
                             f"{', '.join(toy_problems.PROBLEMS)} (default: gp1d)")
    parser.add_argument("--all", action="store_true", help=f"every 2D toy, cheapest first: {', '.join(ALL)} "
                        "(default: only --problem)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per model: --seed, --seed + 1, ...; each seed "
                        "trains its own runs and scores its own held-out contexts (default: 1)")
    parser.add_argument("--steps", type=int, help="training steps per model (default: the problem's, "
                        "as in train.py --help)")
    parser.add_argument("--eval-every", type=int, help="steps between the scores of the learning curve, 0 = none "
                        "(default: a tenth of the steps)")
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
    parser.add_argument("--results", help="folder for the results files NAME.json (default: <--out>/results; "
                        "--results assets/results refreshes the README's)")
    parser.add_argument("--figures", help="folder for the figures (default: <--out>/figures; "
                        "--figures assets refreshes the README's)")
    parser.add_argument("--table", metavar="JSON", help="only print the markdown table of this results file "
                        "(default: benchmark)")
    parser.add_argument("--readme", nargs="?", const="README.md", metavar="PATH", help="only rewrite the result "
                        "tables of this README (default when given: README.md) from --results "
                        "(here: default assets/results)")
    parser.add_argument("--speed", action="store_true", help="only time 100 training steps (or --steps) of every "
                        "toy's DFM under each thread setting, --seeds times, and write <--results>/speed.json, "
                        "the README's Speed table; run it on a quiet machine (default: benchmark)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (default: show them)")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(any_table(json.load(f)))
        return
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        with open(args.readme, "w") as f:
            f.write(readme_with_tables(text, args.results or os.path.join("assets", "results")))
        return
    args.figures = args.figures or os.path.join(args.out, "figures")
    args.results = args.results or os.path.join(args.out, "results")
    if args.speed:
        measure_speed(args)
        return
    m = machine()
    print(f"machine: {m['cpu']}, {m['cpus']} cpus, torch {m['torch']} ({m['threads']} threads), device {m['device']}")
    try:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be an integer >= 1, got {args.seeds}")
        for name in ALL if args.all else args.problem:
            bench(name, args)
    except (ValueError, FileNotFoundError) as e:  # a bad option, or a run in --out that does not match
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
