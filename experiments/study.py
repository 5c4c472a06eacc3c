"""The paper's open questions, measured against exact posteriors: four studies.

    python -m experiments.study finite       # 1. finitely many observations per signal (gp1d, flatland)
    python -m experiments.study forward      # 2. an imperfect forward model (gp1d, flatland, motion)
    python -m experiments.study contexts     # 3. how many context views (flatland)
    python -m experiments.study guidance     # 4. classifier-free guidance and temperature (flatland)
    python -m experiments.study all --small  # all four in the student setting, in minutes

The paper proves that DFM learns the true conditional distribution in the limit of
infinitely many observations per signal and a perfect forward model. Our toy problems
have exact posteriors, so we can measure what happens short of that. Each study trains
the runs it needs with train.train_or_resume into --out/runs (a finished run found there
is loaded, not retrained, so the studies share their baselines and a stopped study
continues where it stopped), scores every model with its problem's evaluate() on the
held-out contexts, prints a markdown table and saves a plot and the numbers
(<study>.png, <study>.json) in --save.

Every run trains for the study budget (BUDGET, shorter than the problems' defaults so that
the four studies fit in a few hours on a 2-core CPU; --small: SMALL_BUDGET and fewer
levels) and is scored as SCORING (--small: SMALL_SCORING) says. Scores are distances to
the exact posterior (lower is better); the floor is the distance between two independent
exact sample sets of the same size, the best any model can score.
"""
import argparse
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

import toy_problems
import config
import train
from experiments import tables

BUDGET = {"gp1d": dict(steps=2000, batch_size=128), "flatland": dict(steps=800, batch_size=32),
          "motion": dict(steps=800, batch_size=32)}
SMALL_BUDGET = {"gp1d": dict(steps=400, batch_size=64), "flatland": dict(steps=150, batch_size=16),
                "motion": dict(steps=150, batch_size=16)}
# Scoring: each problem's evaluate() defaults (the benchmark's), except gp1d's 64 contexts x 64
# samples, whose autoregressive whole-signal samples take minutes per run on one CPU thread.
SCORING = {"gp1d": dict(n_contexts=32, n_samples=32)}
SMALL_SCORING = {"gp1d": dict(n_contexts=16, n_samples=16), "flatland": dict(n_contexts=8, n_samples=16),
                 "motion": dict(n_contexts=8, n_samples=32)}  # --small: fewer contexts and samples, noisier
MAIN_SCORE = {"gp1d": "window", "flatland": "views", "motion": "tv_joint"}  # what the plots show
# The studies look at flatland through one context view, as its fixed data sets (--signals) see it: each run
# trains on one context view unless it sets --contexts or --signals, and each scene is read off the target
# view alone (views_in_turn=0), so that what a study varies is all that differs between its rows.
ONE_VIEW_TRAINING = {"flatland": dict(contexts=1)}
ONE_VIEW_SCORING = {"flatland": dict(views_in_turn=0)}


def train_run(args, problem, model="dfm", **overrides):
    """Train (or finish, or load) one run at the study budget; returns its EMA model."""
    budget = {**(SMALL_BUDGET if args.small else BUDGET)[problem], **({"steps": args.steps} if args.steps else {})}
    if not {"contexts", "signals"} & set(overrides):
        budget.update(ONE_VIEW_TRAINING.get(problem, {}))
    name = "-".join([problem, model] + [f"{key}{value}" for key, value in overrides.items()])
    cfg = config.make_config(problem, model=model, seed=args.seed, eval_every=0,
                             out_dir=os.path.join(args.out, "runs", name), **budget, **overrides)
    model, _ = train.train_or_resume(cfg, progress=not args.no_progress)
    return model


def score(args, problem, model, **evaluate_kwargs):
    """The problem's evaluate() at SCORING's settings (SMALL_SCORING's with --small), or tiny with --tiny."""
    settings = (dict(n_contexts=2, n_samples=4, steps=5) if args.tiny else
                (SMALL_SCORING if args.small else SCORING).get(problem, {}))
    return toy_problems.load(problem).evaluate(model, seed=args.seed, **settings,
                                               **ONE_VIEW_SCORING.get(problem, {}), **evaluate_kwargs)


# -----------------------------------------------------------------------------
# The four studies: each returns a list of rows, a dict of what was varied and the scores


def study_finite(args):
    """1. Train DFM on a fixed data set of S signals, each seen in only V views, for the same
    number of steps as on the prior itself (a new signal for every example, 'inf')."""
    views, signals = ([2, 8], [64]) if args.small else ([2, 3, 4, 8], [64, 1024])
    rows = []
    for problem in ["gp1d", "flatland"]:
        rows.append(dict(problem=problem, S="inf", V="inf", **score(args, problem, train_run(args, problem))))
        for S in signals:
            for V in views:
                model = train_run(args, problem, signals=S, views=V)
                rows.append(dict(problem=problem, S=S, V=V, **score(args, problem, model)))
    return rows


def study_forward(args):
    """2. Train and sample with a forward model that is off by a controlled amount. The oracle
    never uses the forward model (it diffuses the signal itself), so one run serves every size."""
    errors = ([("gp1d", "shift", [1]), ("flatland", "focal", [0.1])] if args.small else
              [("gp1d", "shift", [1, 2]), ("gp1d", "blur", [0.5, 1.0]), ("flatland", "focal", [0.05, 0.15]),
               ("flatland", "pose", [0.05, 0.15]), ("motion", "nearest", [0.5, 1.0])])
    rows = []
    for problem, kind, sizes in errors:
        for model in ["dfm", "deterministic"]:
            for size in sizes:
                trained = train_run(args, problem, model, forward_error=kind, forward_error_size=size)
                rows.append(dict(problem=problem, forward_error=kind, size=size, model=model,
                                 **score(args, problem, trained)))
    for problem in dict.fromkeys(problem for problem, _, _ in errors):  # the exact forward model: size 0
        for model in ["dfm", "deterministic", "oracle"]:
            rows.append(dict(problem=problem, forward_error="none", size=0, model=model,
                             **score(args, problem, train_run(args, problem, model))))
    return rows


def study_contexts(args):
    """3. One DFM trained with 1..3 context views per example on flatland, conditioned on 1, 2, 3 views."""
    model = train_run(args, "flatland", contexts=3)
    return [dict(problem="flatland", n_ctxt=k, **score(args, "flatland", model, n_ctxt=k)) for k in (1, 2, 3)]


def study_guidance(args):
    """4. DFM trained with context dropout (0.1, the authors'), sampled with classifier-free
    guidance and a lower initial-noise temperature (0.85, the authors')."""
    model = train_run(args, "flatland", ctxt_drop_prob=0.1)
    return [dict(problem="flatland", guidance=g, temperature=tau,
                 **score(args, "flatland", model, guidance=g, temperature=tau))
            for tau in (1.0, 0.85) for g in ([1.0, 3.0] if args.small else [1.0, 1.5, 2.0, 3.0])]


# name: (the study, what its rows vary, its title)
STUDIES = {"finite": (study_finite, ["S", "V"], "finitely many observations per signal"),
           "forward": (study_forward, ["forward_error", "size", "model"], "an imperfect forward model"),
           "contexts": (study_contexts, ["n_ctxt"], "how many context views"),
           "guidance": (study_guidance, ["guidance", "temperature"], "guidance and temperature")}


# -----------------------------------------------------------------------------
# Tables and plots


def save(fig, path):
    fig.tight_layout()
    toy_problems.save_figure(fig, path)


def plot_finite(rows, path):
    problems = list(dict.fromkeys(row["problem"] for row in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 3.6), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        mine, name = [row for row in rows if row["problem"] == problem], MAIN_SCORE[problem]
        views = sorted({row["V"] for row in mine if row["V"] != "inf"})
        for S in sorted({row["S"] for row in mine if row["S"] != "inf"}):
            points = sorted((row["V"], row[name]) for row in mine if row["S"] == S)
            ax.plot(*zip(*points), marker="o", label=f"S = {S} signals")
        prior = next(row for row in mine if row["S"] == "inf")
        ax.axhline(prior[name], color="black", ls="--", lw=1, label="a new signal every example")
        ax.axhline(prior[name + "_floor"], color="grey", ls=":", lw=1, label="floor (exact vs exact)")
        ax.set_xscale("log", base=2), ax.set_xticks(views, [str(v) for v in views])
        ax.set_xlabel("views per signal, V"), ax.set_ylabel(f"{name}: distance to the exact posterior")
        ax.set_title(problem), ax.legend(fontsize=8)
    fig.suptitle("DFM trained on S signals seen in V views each, for the same number of steps")
    save(fig, path)


def plot_forward(rows, path):
    panels = list(dict.fromkeys((row["problem"], row["forward_error"]) for row in rows
                                if row["forward_error"] != "none"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    colors = {"dfm": "tab:red", "deterministic": "tab:blue", "oracle": "tab:green"}
    for ax, (problem, kind) in zip(axes[0], panels):
        name = MAIN_SCORE[problem]
        mine = [row for row in rows if row["problem"] == problem and row["forward_error"] in (kind, "none")]
        sizes = sorted({row["size"] for row in mine})
        for model, color in colors.items():
            points = sorted((row["size"], row[name]) for row in mine if row["model"] == model)
            if model == "oracle":  # trained without the forward model: the same run at every size
                points = [(size, points[0][1]) for size in sizes]
            ax.plot(*zip(*points), marker="o", color=color, ls="--" if model == "oracle" else "-", label=model)
        ax.axhline(mine[0][name + "_floor"], color="grey", ls=":", lw=1, label="floor")
        ax.set_xticks(sizes), ax.set_xlabel(f"{kind} error"), ax.set_ylabel(name), ax.set_title(f"{problem}: {kind}")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Distance to the exact posterior when the forward model is off (oracle: does not use it)")
    save(fig, path)


def plot_contexts(rows, path):
    fig, (ax_dist, ax_spread) = plt.subplots(1, 2, figsize=(9, 3.4))
    k = [row["n_ctxt"] for row in rows]
    ax_dist.plot(k, [row["views"] for row in rows], marker="o", color="tab:red", label="DFM")
    ax_dist.plot(k, [row["views_floor"] for row in rows], marker="o", color="grey", ls=":", label="floor")
    ax_dist.set_ylabel("views: distance to the exact posterior")
    ax_spread.plot(k, [row["spread"] for row in rows], marker="o", color="tab:red", label="DFM samples")
    ax_spread.plot(k, [row["spread_exact"] for row in rows], marker="o", color="black", label="exact posterior")
    ax_spread.set_ylabel("spread: distance between two samples")
    for ax in (ax_dist, ax_spread):
        ax.set_xticks(k), ax.set_xlabel("context views"), ax.legend(fontsize=8)
    fig.suptitle("flatland: one DFM conditioned on 1, 2 and 3 views of each held-out scene")
    save(fig, path)


def plot_guidance(rows, path):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for tau, ls in ((1.0, "-"), (0.85, "--")):
        mine = [row for row in rows if row["temperature"] == tau]
        g = [row["guidance"] for row in mine]
        for ax, name in zip(axes, ("views", "psnr", "spread")):
            ax.plot(g, [row[name] for row in mine], marker="o", color="tab:red", ls=ls, label=f"temperature {tau}")
    for ax, name, ref in zip(axes, ("views", "psnr", "spread"), ("views_floor", "psnr_exact", "spread_exact")):
        ax.axhline(rows[0][ref], color="grey", ls=":", label=ref.replace("_", " "))
        ax.set_xlabel("guidance scale"), ax.set_ylabel(name), ax.legend(fontsize=8)
    axes[0].set_title("distance to the posterior (lower is better)", fontsize=9)
    axes[1].set_title("PSNR against the true scene (higher is better)", fontsize=9)
    axes[2].set_title("diversity of the samples", fontsize=9)
    fig.suptitle("flatland: classifier-free guidance and initial-noise temperature")
    save(fig, path)


PLOTS = {"finite": plot_finite, "forward": plot_forward, "contexts": plot_contexts, "guidance": plot_guidance}


def main():
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("study", choices=[*STUDIES, "all"], help="which study to run (all: the four, one after "
                        "another)")
    parser.add_argument("--small", action="store_true", help="the student setting: fewer levels and SMALL_BUDGET "
                        "(default: the full setting, BUDGET)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and of the held-out contexts, "
                        "in [0, 2^30) (default: 0)")
    parser.add_argument("--out", help="folder for the runs, reused when found (default: out/studies, "
                        "or out/studies-small with --small)")
    parser.add_argument("--save", help="folder for <study>.png and <study>.json (default: --out; RESULTS.md's "
                        "and the notebook's are in assets/studies)")
    parser.add_argument("--steps", type=int, help="training steps of every run, overriding the budget; for "
                        "trying the machinery (default: the budget's)")
    parser.add_argument("--tiny", action="store_true", help="score on 2 contexts x 4 samples x 5 sampler steps; "
                        "for trying the machinery (default: each problem's evaluate() settings)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (default: show them)")
    args = parser.parse_args()
    args.out = args.out or os.path.join("out", "studies-small" if args.small else "studies")
    args.save = args.save or args.out
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be an integer >= 1, got {args.steps}")
    if not 0 <= args.seed < 2 ** toy_problems.SEED_BITS:
        parser.error(f"--seed must be in [0, 2^{toy_problems.SEED_BITS}), got {args.seed}")
    for name in STUDIES if args.study == "all" else [args.study]:
        study, varied, title = STUDIES[name]
        try:
            rows = study(args)
        except (ValueError, FileNotFoundError) as e:  # a run in --out with another config, or a bad option
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:  # the run saved its checkpoint, and --out reuses it next time
            print(str(e) or "interrupted", file=sys.stderr)
            sys.exit(130)
        setting = dict(small=args.small, seed=args.seed, budget=SMALL_BUDGET if args.small else BUDGET,
                       steps=args.steps, tiny=args.tiny)
        command = "python -m experiments.study " + " ".join(sys.argv[1:])
        tables.write_json(dict(study=name, varied=varied, command=command, machine=tables.machine(), setting=setting,
                               rows=rows), os.path.join(args.save, f"{name}.json"))
        PLOTS[name](rows, os.path.join(args.save, f"{name}.png"))
        print(f"\n## {name}: {title}")
        print(tables.study_table(rows, varied))
        print(f"plot: {os.path.join(args.save, name + '.png')}, numbers: {os.path.join(args.save, name + '.json')}",
              flush=True)


if __name__ == "__main__":
    main()
