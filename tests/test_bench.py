"""experiments/bench.py end to end at a tiny budget (the 2D toys, and the 3D problem from exported weights), and
RESULTS.md's tables and README.md's summary tied to their results files by experiments/tables.py."""
import dataclasses
import json
import os
import shutil
import statistics
import sys

import pytest

from experiments import bench, tables
import toy_problems
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS, STUDIES = os.path.join(ROOT, "assets", "results"), os.path.join(ROOT, "assets", "studies")


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_bench_all_writes_results_with_seed_spread_curves_and_tables(monkeypatch, capsys, tmp_path):
    for name in bench.ALL:  # a tiny batch: the run is about the bookkeeping of seeds, curves and tables
        problem = toy_problems.load(name)
        monkeypatch.setattr(problem, "TRAIN_DEFAULTS", dict(problem.TRAIN_DEFAULTS, batch_size=2))
    monkeypatch.setattr(train, "CURVE_EVAL", dict(n_contexts=2, n_samples=2, steps=2))
    monkeypatch.setattr(sys, "argv", ["bench", "--all", "--seeds", "2", "--steps", "2", "--eval-every", "1",
                                      "--n-contexts", "2", "--n-samples", "2", "--sample-steps", "2",
                                      "--out", str(tmp_path), "--no-progress"])
    bench.main()
    printed = capsys.readouterr().out
    for name in bench.ALL:
        with open(tmp_path / "results" / f"{name}.json") as f:
            results = json.load(f)
        assert results["seeds"] == [0, 1] and results["machine"]["torch"]
        runs = results["runs"]
        for kind in bench.KINDS:
            assert [r["seed"] for r in runs[kind]] == [0, 1]
            assert [[point["step"] for point in r["curve"]] for r in runs[kind]] == [[1, 2], [1, 2]]
            for column, stat in results["summary"][kind].items():
                values = [r["scores"][column] for r in runs[kind]]
                assert stat["mean"] == pytest.approx(statistics.fmean(values))
                assert stat["sd"] == pytest.approx(statistics.stdev(values))
        distance = next(iter(results["ratios"]["dfm/oracle"]))  # the first score with a floor
        assert distance + "_floor" in runs["dfm"][0]["scores"]
        ratio = results["ratios"]["dfm/oracle"][distance]["per_seed"]
        assert ratio == [d["scores"][distance] / o["scores"][distance] for d, o in zip(runs["dfm"], runs["oracle"])]
        assert tables.results_table(results) in printed
        assert (tmp_path / "figures" / f"{name}-curves.png").exists()
        assert (tmp_path / "figures" / f"{name}-dfm.png").exists()
    with open(tmp_path / "results" / "gp1d.json") as f:  # the oracle is also scored window by window, as DFM samples
        assert "signal_by_window" in json.load(f)["summary"]["oracle"]


def test_the_3d_benchmark_scores_exported_weights_as_it_scores_the_runs_they_came_from(monkeypatch, tmp_path):
    """Two models (no oracle), the ratio DFM/deterministic on the distances with a floor, the figures; and
    --weights on the exported EMA weights gives the same scores without training."""
    from toy_problems import metrics, scenes3d
    tiny = dataclasses.replace(scenes3d.SETTINGS["scenes3d"], ch=8, feat=8, width=16, out_feat=4, n_samples=4,
                               n_importance=4, patch=6, cond_size=8)
    monkeypatch.setitem(scenes3d.SETTINGS, "scenes3d", tiny)
    monkeypatch.setitem(scenes3d.TRAIN_DEFAULTS, "scenes3d", dict(scenes3d.TRAIN_DEFAULTS["scenes3d"], batch_size=1))
    monkeypatch.setattr(metrics, "load_lpips", lambda: (None, "LPIPS unavailable: not fetched in tests"))
    scoring = ["--n-contexts", "1", "--n-samples", "2", "--sample-steps", "2", "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["bench", "--problem", "scenes3d", "--steps", "1", "--out", str(tmp_path),
                                      "--export", str(tmp_path / "weights"), *scoring])
    bench.main()
    with open(tmp_path / "results" / "scenes3d.json") as f:
        trained = json.load(f)
    assert list(trained["runs"]) == ["dfm", "deterministic"] and list(trained["ratios"]) == ["dfm/deterministic"]
    assert set(trained["summary"]["floor"]) == set(trained["ratios"]["dfm/deterministic"]) == {"back_tv", "views"}
    for figure in ("samples.png", "orbit.gif", "dfm-histograms.png", "deterministic-histograms.png"):
        assert (tmp_path / "figures" / f"scenes3d-{figure}").exists()
    monkeypatch.setattr(sys, "argv", ["bench", "--problem", "scenes3d", "--weights", str(tmp_path / "weights"),
                                      "--out", str(tmp_path / "scored"), *scoring])
    bench.main()
    with open(tmp_path / "scored" / "results" / "scenes3d.json") as f:
        scored = json.load(f)
    assert not (tmp_path / "scored" / "scenes3d-dfm-seed0").exists()  # nothing trained
    for kind in ("dfm", "deterministic"):
        scores = [{c: v for c, v in results["runs"][kind][0]["scores"].items() if c not in tables.TIMINGS}
                  for results in (trained, scored)]
        assert scores[1] == pytest.approx(scores[0], rel=1e-3, nan_ok=True)  # exported in half precision


def test_bad_weights_options_are_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    for extra, message in [(["--steps", "5"], "--weights scores exported weights, one run per model: it takes no "
                                               "--steps"),
                           ([], f"--weights {tmp_path}: no {tmp_path}/scenes3d-dfm.pt (written by --export)")]:
        monkeypatch.setattr(sys, "argv", ["bench", "--problem", "scenes3d", "--weights", str(tmp_path), *extra])
        with pytest.raises(SystemExit) as e:
            bench.main()
        out, err = capsys.readouterr()
        assert e.value.code == 2 and err == f"error: {message}\n" and "machine" not in out


@pytest.mark.parametrize("name", tables.FILES)
def test_every_generated_table_is_its_results_file(name):
    """Every block of RESULTS.md and README.md is made again, number for number, from assets/results and
    assets/studies: a hand-edited or stale table fails here. Every results file and study has its block."""
    text = read(name)
    assert tables.with_tables(text, RESULTS, STUDIES) == text, "run: python -m experiments.bench --readme"
    if name == "RESULTS.md":
        results = sorted(f[:-len(".json")] for f in os.listdir(RESULTS) if f.endswith(".json"))
        assert sorted(match.group(2) for match in tables.BLOCK.finditer(text)) == results
        studies = sorted(f[:-len(".json")] for f in os.listdir(STUDIES) if f.endswith(".json"))
        assert sorted(match.group(2) for match in tables.STUDY_BLOCK.finditer(text)) == studies
    else:
        assert len(tables.SUMMARY_BLOCK.findall(text)) == 1


def test_the_readmes_summary_holds_each_problems_headline_ratios_and_cpu_minutes():
    block = tables.SUMMARY_BLOCK.search(read("README.md")).group(2)
    speed = json.loads(read("assets/results/speed.json"))
    for name, distance in tables.HEADLINE.items():
        if not os.path.exists(os.path.join(RESULTS, f"{name}.json")):
            continue
        results = json.loads(read(f"assets/results/{name}.json"))
        ratio = results["ratios"]["dfm/deterministic"][distance]
        row = next(line for line in block.splitlines() if line.startswith(f"| {name} |"))
        assert tables.cell(ratio, 2) in row and f"| {results['settings']['steps']} x " in row
        if name in speed["ms_per_step"]:
            ms_per_step = statistics.median(speed["ms_per_step"][name][tables.ONE_THREAD])
            minutes = ms_per_step * results["settings"]["steps"] / 60000
            assert f"| {minutes:.1f} |" in row


def hand_edited(text, pattern):
    """text with one number changed in the first table row of the first block that pattern finds."""
    block = pattern.search(text).group(0)
    row = next(line for line in block.splitlines() if line.startswith("| ") and "---" not in line
               and any(c.isdigit() for c in line[2:]) and not line.startswith("| problem | headline"))
    digit = next(c for c in row[2:] if c.isdigit())
    return text.replace(row, row.replace(digit, str((int(digit) + 1) % 10)), 1)


@pytest.mark.parametrize("block", ["results", "study", "summary"])
def test_a_hand_edited_table_is_caught_and_rewritten(block):
    """One number changed in a table makes its file differ from what --readme makes; --readme restores it."""
    pattern, name = {"results": (tables.BLOCK, "RESULTS.md"), "study": (tables.STUDY_BLOCK, "RESULTS.md"),
                     "summary": (tables.SUMMARY_BLOCK, "README.md")}[block]
    text = read(name)
    edited = hand_edited(text, pattern)
    assert edited != text and tables.with_tables(edited, RESULTS, STUDIES) == text


def test_a_results_block_is_rewritten_from_its_results_file(tmp_path):
    results = {"problem": "toy", "command": "python -m experiments.bench --problem toy",
               "columns": ["d", "train ms/step"], "seeds": [0, 1], "settings": {"steps": 5, "batch_size": 2},
               "machine": {"cpu": "x86_64", "cpus": 2, "threads": 1, "device": "cpu", "torch": "2.14.1"},
               "summary": {**{k: {"d": {"mean": 0.5, "sd": 0.25}, "train ms/step": {"mean": 10.0, "sd": 1.0}}
                              for k in bench.KINDS}, "floor": {"d": {"mean": 0.125, "sd": None}}},
               "ratios": {"dfm/oracle": {"d": {"mean": 1.0, "sd": 0.0}},
                          "dfm/deterministic": {"d": {"mean": 2.0, "sd": 0.5}}}}
    (tmp_path / "toy.json").write_text(json.dumps(results))
    stale = "intro\n<!-- results toy: made by experiments/bench.py -->\n| dfm | 0.4999 |\n<!-- /results -->\nafter\n"
    new = tables.with_tables(stale, str(tmp_path), STUDIES)
    assert new.startswith("intro\n<!-- results toy: made by experiments/bench.py -->\n") and \
        new.endswith("<!-- /results -->\nafter\n")
    assert ("Made by `python -m experiments.bench --problem toy` on x86_64, 2 cpus, 1 thread(s), device cpu, "
            "torch 2.14.1.") in new
    assert "| dfm | 0.5000 ± 0.2500 | 10.0 ± 1.0 |" in new
    assert "| floor (exact vs exact) | 0.1250 | - |" in new
    assert "| dfm / deterministic | 2.00 ± 0.50 |" in new
    assert tables.with_tables(new, str(tmp_path), STUDIES) == new


@pytest.mark.parametrize("fault", ["no folder", "no file", "empty", "truncated", "incomplete"])
def test_readme_refuses_a_bad_results_folder_in_one_line_and_writes_nothing(fault, monkeypatch, capsys, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    for name in tables.FILES:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(STUDIES, tmp_path / "assets" / "studies")
    monkeypatch.chdir(tmp_path)
    given = "no/such/folder" if fault == "no folder" else str(results)
    gp1d = results / "gp1d.json"
    if fault == "no file":
        gp1d.unlink()
    elif fault == "empty":
        gp1d.write_text("")
    elif fault in ("truncated", "incomplete"):
        whole = gp1d.read_text()
        gp1d.write_text(whole[:len(whole) // 2] if fault == "truncated" else json.dumps({"problem": "gp1d"}))
    monkeypatch.setattr(sys, "argv", ["bench", "--readme", "--results", given])
    with pytest.raises(SystemExit) as e:
        bench.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert {"no folder": "no such folder", "no file": "no results file", "empty": "is empty",
            "truncated": "not whole JSON", "incomplete": "lacks the entry"}[fault] in err
    for name in tables.FILES:
        assert (tmp_path / name).read_text() == read(name)
    assert sorted(os.listdir(tmp_path)) == sorted([*tables.FILES, "results", "assets"])  # no temporary file left


def test_readme_rewrites_both_files_from_the_results(monkeypatch, tmp_path):
    for name, pattern in zip(tables.FILES, (tables.BLOCK, tables.SUMMARY_BLOCK)):  # stale: one number off in each
        (tmp_path / name).write_text(hand_edited(read(name), pattern))
    shutil.copytree(STUDIES, tmp_path / "assets" / "studies")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench", "--readme", "--results", RESULTS])
    bench.main()
    for name in tables.FILES:
        assert (tmp_path / name).read_text() == read(name)


def test_speed_times_the_training_command_and_tabulates_medians(monkeypatch, capsys, tmp_path):
    """--speed runs train.py in fresh processes (the wait policy is read when torch loads) and the table shows
    each setting's median and range, the load averages, and the default budget's time."""
    assert bench.train_ms_per_step("gan_inversion", 2, {"OMP_NUM_THREADS": "1"}) > 0  # a real run, parsed
    fake = iter(range(1, 100))
    monkeypatch.setattr(bench, "train_ms_per_step", lambda name, steps, environment: float(next(fake)))
    monkeypatch.setattr(sys, "argv", ["bench", "--speed", "--seeds", "3", "--results", str(tmp_path)])
    bench.main()
    with open(tmp_path / "speed.json") as f:
        results = json.load(f)
    n = len(bench.SPEED_SETTINGS)
    problems = len(bench.SPEED_PROBLEMS)
    first = results["ms_per_step"][bench.ALL[0]]  # repetitions in rotation: 1, then 1 + 5n, then 1 + 10n
    assert first[bench.SPEED_SETTINGS[0][0]] == [1.0, 1.0 + problems * n, 1.0 + 2 * problems * n]
    steps = toy_problems.load(bench.ALL[0]).TRAIN_DEFAULTS["steps"]
    median = 1.0 + problems * n
    row = next(line for line in tables.speed_table(results).splitlines() if line.startswith(f"| {bench.ALL[0]} |"))
    assert row.startswith(f"| {bench.ALL[0]} | {median:.1f} (1.0-{1.0 + 2 * problems * n:.1f}) |")
    assert row.endswith(f"{median * steps / 60000:.1f} min |")
    assert "load average (1, 5, 15 min)" in capsys.readouterr().out


def test_the_memory_table_counts_each_gpu_setting_in_both_precisions(monkeypatch, tmp_path):
    counted = {"weights": 2 ** 30, "activations": 2 ** 31}
    monkeypatch.setattr(bench, "training_memory", lambda name, precision: {**counted, "total": 3 * 2 ** 30,
                                                                           "gpu_peak": None})
    monkeypatch.setattr(sys, "argv", ["bench", "--memory", "--results", str(tmp_path)])
    bench.main()
    results = json.loads((tmp_path / "memory3d.json").read_text())
    assert [(r["problem"], r["precision"]) for r in results["rows"]] == [
        ("scenes3d-64", "fp32"), ("scenes3d-64", "bf16"), ("scenes3d-128", "fp32"), ("scenes3d-128", "bf16")]
    assert "| scenes3d-64 | 64x64 | fp32 | 1.000 | 2.000 | 3.000 | no GPU |" in tables.any_table(results)


# -----------------------------------------------------------------------------
# The weights the notebooks ship: notebooks/<problem>-<model>.pt, from `--export notebooks`

SHIPPED_MB = 15  # all the toys' shipped weights together, the 3D ones included


@pytest.mark.parametrize("name", bench.ALL)
def test_the_shipped_weights_score_what_the_results_file_recorded_at_the_end_of_their_run(name):
    """Each notebooks/<name>-<kind>.pt holds the EMA weights of the benchmark's seed-0 run in the results file
    (half precision): scored as that run's learning curve scored them at its last step (train.CURVE_EVAL, seed 0),
    they give the same distances, up to what half precision moves them (well under the seed-to-seed spread)."""
    results = tables.load_results(os.path.join(RESULTS, f"{name}.json"))
    problem = toy_problems.load(name)
    for kind in bench.KINDS:
        run = results["runs"][kind][0]
        model, cfg = train.load_ema_model(os.path.join(ROOT, "notebooks", f"{name}-{kind}.pt"))
        assert (cfg.problem, cfg.model, cfg.seed, cfg.steps) == (name, kind, run["seed"], results["settings"]["steps"])
        last = run["curve"][-1]
        assert last["step"] == cfg.steps
        scores = problem.evaluate(model, seed=cfg.seed, **train.CURVE_EVAL)
        distances = [c for c in last if c + "_floor" in last]
        assert {c: scores[c] for c in distances} == pytest.approx({c: last[c] for c in distances}, rel=0.02), kind


def test_the_shipped_weights_are_small():
    shipped = [f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".pt")]
    assert {f"{name}-{kind}.pt" for name in bench.ALL for kind in bench.KINDS} <= set(shipped)
    size = sum(os.path.getsize(os.path.join(ROOT, "notebooks", f)) for f in shipped)
    assert size <= SHIPPED_MB * 2 ** 20, f"{size / 2 ** 20:.1f} MB"
