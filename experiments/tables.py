"""Results files to markdown: every table of RESULTS.md and the summary table of README.md.

    python -m experiments.bench --readme                        # rewrite both from assets/results, assets/studies
    python -m experiments.bench --table assets/results/gp1d.json   # print one table

A generated table sits between two markers, and tests/test_bench.py checks that each is its
file's table, number for number:
    <!-- results NAME: made by ... -->  ...  <!-- /results -->   the table of <results>/NAME.json
    <!-- study NAME: made by ... -->    ...  <!-- /study -->     the tables of assets/studies/NAME.json
    <!-- summary: made by ... -->       ...  <!-- /summary -->   one row per problem, from the results files
Every table opens with a line naming the command, machine, threads and torch version that made it.
"""
import json
import os
import platform
import re
import statistics

import torch

import toy_problems

TIMINGS = ["train ms/step", "sample ms/sample"]
ONE_THREAD = "1 thread"  # the speed setting of the summary's CPU minutes
# The distance each problem's summary row shows, and the order of the rows.
HEADLINE = {"gp1d": "window", "flatland": "views", "motion": "tv_joint", "gan_inversion": "latent",
            "scenes3d": "back_tv"}
BLOCK = re.compile(r"(<!-- results ([\w-]+)[^>]*-->\n)(.*?)(<!-- /results -->)", re.S)
STUDY_BLOCK = re.compile(r"(<!-- study (\w+)[^>]*-->\n)(.*?)(<!-- /study -->)", re.S)
SUMMARY_BLOCK = re.compile(r"(<!-- summary[^>]*-->\n)(.*?)(<!-- /summary -->)", re.S)
FILES = ["RESULTS.md", "README.md"]  # the files --readme rewrites
SHOWN = {"gp1d": ["window", "signal"], "flatland": ["views", "position", "psnr", "spread"],
         "motion": ["tv_joint", "tv_sprite", "frame_mse"]}  # a study's columns, by problem


def markdown_table(header, rows):
    """The one table writer: a header row, the separator, then one row per list of cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows])


def cell(stat, digits):
    """mean ± sd of a {"mean", "sd"} (sd None: one seed), or - for no value."""
    if stat is None:
        return "-"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat["sd"] is not None else "")


def made_by(results):
    """The line that says what made a table: its command, and the machine (threads: where one number holds for
    the whole table; the speed table's columns are thread settings)."""
    m = results["machine"]
    threads = f"{m['threads']} thread(s), " if "threads" in m else ""
    device = f"device {m['device']}, " if "device" in m else ""
    return f"Made by `{results['command']}` on {m['cpu']}, {m['cpus']} cpus, {threads}{device}torch {m['torch']}."


def results_table(results):
    """A benchmark's results: the scores (mean ± sd over the seeds) with the floor, and the ratios of DFM's
    distances to the other models', computed seed by seed."""
    columns, summary, s = results["columns"], results["summary"], results["settings"]
    scored = f", {s['n_contexts']} held-out contexts x {s['n_samples']} samples" if s.get("n_contexts") else ""
    seeds = (f"seed {results['seeds'][0]}" if len(results["seeds"]) == 1 else
             f"seeds {', '.join(map(str, results['seeds']))} (mean ± sd over seeds)")
    lines = [made_by(results),
             f"{results['problem']}: {s['steps']} steps x batch {s['batch_size']} per model, {seeds}{scored}; "
             "distances to the exact posterior (the columns with a floor), lower is better", ""]
    rows = [[label] + [cell(summary[kind].get(c), 1 if c in TIMINGS else 4) for c in columns]
            for kind, label in [(k, k) for k in summary if k != "floor"] + [("floor", "floor (exact vs exact)")]]
    distances = list(next(iter(results["ratios"].values())))
    ratios = [[ratio.replace("/", " / ")] + [cell(by_column[c], 2) for c in distances]
              for ratio, by_column in results["ratios"].items()]
    return "\n".join(lines + [markdown_table(["model", *columns], rows), "",
                              markdown_table(["ratio, seed by seed", *distances], ratios)])


def speed_table(results):
    """Training speed: the median (and range) of each setting's repetitions, and the default budget's training
    time at the default setting."""
    labels = list(next(iter(results["ms_per_step"].values())))
    before, after = (", ".join(f"{x:.2f}" for x in results[k]) for k in ("load_average_before", "load_average_after"))
    rows = []
    for name, by_label in results["ms_per_step"].items():
        d = results["defaults"][name]
        minutes = statistics.median(by_label[labels[0]]) * d["steps"] / 60000
        rows.append([name] + [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in by_label.values()]
                    + [f"{d['steps']} x {d['batch_size']}", f"{minutes:.1f} min"])
    return "\n".join([made_by(results),
                      f"ms per DFM training step, median (min-max) of {results['repetitions']} runs of "
                      f"{results['steps']} steps each; load average (1, 5, 15 min) {before} before, {after} after", "",
                      markdown_table(["problem", *labels, "default steps x batch", "default training time"], rows)])


def memory_table(results):
    """Training memory of one example (batch 1) of the 3D settings, counted and (with a GPU) measured."""
    gib = 2 ** 30
    rows = [[r["problem"], r["image"], r["precision"], f"{r['weights'] / gib:.3f}", f"{r['activations'] / gib:.3f}",
             f"{r['total'] / gib:.3f}", "no GPU" if r["gpu_peak"] is None else f"{r['gpu_peak'] / gib:.3f}"]
            for r in results["rows"]]
    return "\n".join([made_by(results), "", markdown_table(
        ["problem", "image", "precision", "weights etc. (GiB)", "saved activations (GiB)", "total (GiB)",
         "GPU peak (GiB)"], rows)])


def diagnose_table(results):
    """experiments/diagnose.py's three checks: the sampler on the exact denoiser, each model's x0 estimates against
    the exact ones by t, and the spread of one context's x0 estimates along DDIM."""
    samplers = [[name, f"{d:.4f}"] for name, d in results["samplers"].items()] + \
        [["floor (exact vs exact)", f"{results['floor']:.4f} ± {results['floor_sd']:.4f}"]]
    kinds = list(results["x0"])
    columns = [(k, c) for k in kinds for c in ("rmse", "slope", "residual")]
    best = "best_rmse" in next(iter(results["x0"][kinds[0]].values()))  # the best DFM denoiser's (in_range)
    columns += [(kinds[0], c) for c in ("best_rmse", "best_slope")] if best else []
    x0 = [[t] + [f"{results['x0'][k][t][c]:.3f}" if c.endswith("slope") else f"{results['x0'][k][t][c]:.4f}"
                 for k, c in columns] for t in results["x0"][kinds[0]]]
    spread = [[t] + [f"{results['spread'][k][t]['model']:.4f}" for k in kinds] +
              [f"{results['spread'][kinds[0]][t][c]:.4f}" for c in ("exact", "best_dfm")[:1 + best]]
              for t in every_tenth(list(results["spread"][kinds[0]]))]
    steps = ", ".join(f"{k} {n} steps" for k, n in results["steps"].items())
    return "\n".join([made_by(results), "", f"Models: {steps}. 1. The sampler driven by the exact denoiser, "
                       "and each model's own samples where measured (energy distance to exact samples; the exact "
                       "denoiser's distance above the floor is the sampler's part of a model's gap, the model's own "
                       "above the exact denoiser's its denoiser's part):", "",
                       markdown_table(["sampler", "distance"], samplers), "",
                       "2. x0 estimates against the exact ones, by t (slope < 1: shrunk towards the posterior mean; "
                       "residual: the error that is not shrinkage):", "",
                       markdown_table(["t"] + [c.replace("best_", "best DFM ") if c.startswith("best") else f"{k} {c}"
                                               for k, c in columns], x0),
                       "", "3. The spread of one context's x0 estimates along DDIM, by t:", "",
                       markdown_table(["t"] + kinds + ["exact denoiser (from DFM's noise)"] +
                                      ["best DFM denoiser (from DFM's noise)"] * best, spread)])


def meshes_table(results):
    """The mesh benchmark (experiments/mesh_bench.py): a row per checkpoint and held-out test set."""
    columns = results["columns"]
    header = ["model", "trained on", "steps x batch", "test set", *(c.replace("hidden_tv_floor", "floor")
                                                                    for c in columns)]
    rows = [[r["model"], r["trained_on"], f"{r['steps']} x {r['batch_size']}",
             r["test"] + (f" (unseen: {', '.join(r['unseen'])})" if r["unseen"] else "")]
            + [f"{r['scores'][c]:.{1 if c in TIMINGS else 4}f}" for c in columns] for r in results["rows"]]
    scored = ", ".join(sorted({f"{r['test']}: {r['scores']['scenes']} scenes" for r in results["rows"]}))
    return "\n".join([made_by(results), f"meshes: held-out scenes ({scored}) x {results['n_samples']} samples; "
                      "hidden_tv against its floor, lower is better", "", markdown_table(header, rows)])


def every_tenth(items):
    """items[::10] and the last one."""
    return items[::10] + ([items[-1]] if (len(items) - 1) % 10 else [])


def any_table(results):
    """The table of a results file, whichever kind it is."""
    if "study" in results:
        return study_tables(results)
    if results["problem"].startswith("diagnose-"):
        return diagnose_table(results)
    return {"speed": speed_table, "memory3d": memory_table, "meshes": meshes_table}.get(results["problem"],
                                                                                        results_table)(results)


def study_tables(results):
    """The tables of a study's file (experiments/study.py), under the line that says what made them."""
    return made_by(results) + "\n" + study_table(results["rows"], results["varied"])


def study_table(rows, varied):
    """Markdown tables, one per problem. A floor (or exact-sample score) that is the same for every
    row goes in the heading: the same held-out contexts and seed give the same exact samples."""
    lines = []
    for problem in dict.fromkeys(row["problem"] for row in rows):
        mine = [row for row in rows if row["problem"] == problem]
        shown = [name for name in SHOWN[problem] if name in mine[0]]
        references = [name + suffix for name in shown for suffix in ("_floor", "_exact") if name + suffix in mine[0]]
        constant = [name for name in references if len({row[name] for row in mine}) == 1]
        columns = shown + [name for name in references if name not in constant]
        heading = ", ".join(f"{name} {mine[0][name]:.4f}" for name in constant)
        lines += [f"\n{problem}" + (f" ({heading})" if heading else "") + "\n", markdown_table(
            varied + columns, [[row[v] for v in varied] + [f"{row[name]:.4f}" for name in columns] for row in mine])]
    return "\n".join(lines)


def summary_table(results_dir):
    """README.md's table of the problems: the default budget, the CPU minutes of one model at that budget on one
    thread, and the ratios of DFM's headline distance to the oracle's and the deterministic model's."""
    speed = load_results(os.path.join(results_dir, "speed.json"))
    rows = []
    for name, distance in HEADLINE.items():
        path = os.path.join(results_dir, f"{name}.json")
        if name == "scenes3d" and not os.path.exists(path):
            continue  # the 3D row appears once its results file does
        results = load_results(path)
        s = results["settings"]
        if name in speed["ms_per_step"]:  # a problem --speed timed: its one-thread median, at the same batch
            timed = speed["defaults"][name]["batch_size"]
            if timed != s["batch_size"]:
                raise ValueError(f"speed.json timed {name} at batch {timed}, its results file trained at batch "
                                 f"{s['batch_size']}: run --speed again")
            ms_per_step = statistics.median(speed["ms_per_step"][name][ONE_THREAD])
        else:  # one --speed did not time: its run's own training time
            ms_per_step = results["summary"]["dfm"]["train ms/step"]["mean"]
        rows.append([name, distance, f"{s['steps']} x {s['batch_size']}", f"{ms_per_step * s['steps'] / 60000:.1f}"]
                    + [cell(results["ratios"].get(f"dfm/{other}", {}).get(distance), 2)
                       for other in ("oracle", "deterministic")])
    return "\n".join(["Made by `python -m experiments.bench --readme` from the results files: ratios of DFM's headline "
                      "distance to the other models', mean ± sd over the seeds; CPU minutes from the one-thread "
                      "speed (speed.json).", "",
                      markdown_table(["problem", "headline distance", "default steps x batch",
                                      "CPU minutes, one model, one thread", "DFM / oracle", "DFM / deterministic"],
                                     rows)])


def load_results(path):
    """A results file, or a one-line ValueError for one that is missing, empty or cut short."""
    if not os.path.isfile(path):
        raise ValueError(f"no results file {path}")
    with open(path) as f:
        text = f.read()
    try:
        results = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{path} is " + ("empty" if not text.strip() else "not whole JSON (truncated?)")) from None
    if not isinstance(results, dict) or not ("problem" in results or "study" in results):
        raise ValueError(f"{path} is not a results file of experiments/bench.py or study.py (expected a JSON object "
                         "with a 'problem' or 'study' entry)")
    return results


def table_of(path):
    """The markdown table of one results file (bench.py --table), or a one-line ValueError for a malformed one."""
    results = load_results(path)
    try:
        return any_table(results)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{path} is not a whole results file: its entry {e} is missing or of the wrong type") from None


def machine():
    """What made a results file: CPU, cores, threads, device, torch and Python versions."""
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(cpu=platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads(), device=device,
                torch=torch.__version__, python=platform.python_version())


def write_json(results, path):
    """Write results to path whole (a temporary file, then rename): a killed run leaves the last results."""
    with toy_problems.written_whole(path) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=1)


def with_tables(text, results_dir, studies_dir):
    """text with every generated block (see the module docstring) made again from the files."""
    def results(match):
        return match.group(1) + any_table(load_results(os.path.join(results_dir, f"{match.group(2)}.json"))) + \
            "\n" + match.group(4)

    def studies(match):
        return match.group(1) + study_tables(load_results(os.path.join(studies_dir, f"{match.group(2)}.json"))) + \
            "\n" + match.group(4)

    text = STUDY_BLOCK.sub(studies, BLOCK.sub(results, text))
    return SUMMARY_BLOCK.sub(lambda m: m.group(1) + summary_table(results_dir) + "\n" + m.group(3), text)


def rewrite(results_dir, studies_dir=os.path.join("assets", "studies"), files=FILES):
    """Rewrite the generated blocks of files from results_dir and studies_dir: every text is made first, and
    written whole (temporary file, then rename) only once all are, so a bad results file changes nothing."""
    for folder, option in ((results_dir, "--results"), (studies_dir, "the studies' folder")):
        if not os.path.isdir(folder):
            raise ValueError(f"{option} {folder}: no such folder")
    texts = {}
    for path in files:
        with open(path) as f:
            old = f.read()
        try:
            texts[path] = with_tables(old, results_dir, studies_dir)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}: a results file in {results_dir} or {studies_dir} lacks the entry {e} "
                             "(or has it of the wrong type)") from None
    for path, text in texts.items():
        with toy_problems.written_whole(path) as tmp, open(tmp, "w") as f:
            f.write(text)
