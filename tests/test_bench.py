"""experiments/bench.py --all end to end at a tiny budget, and the README's result tables tied to their results files."""
import json
import os
import statistics
import sys

import pytest

from experiments import bench
import toy_problems
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_all_writes_results_with_seed_spread_curves_and_tables(monkeypatch, capsys, tmp_path):
    for name in bench.ALL:  # a tiny batch: the run is about the bookkeeping of seeds, curves and tables
        problem = toy_problems.load(name)
        monkeypatch.setattr(problem, "TRAIN_DEFAULTS", dict(problem.TRAIN_DEFAULTS, batch_size=2))
    monkeypatch.setattr(train, "CURVE_EVAL", dict(n_contexts=2, n_samples=2, steps=2))
    monkeypatch.setattr(sys, "argv", ["experiments/bench.py", "--all", "--seeds", "2", "--steps", "2", "--eval-every", "1",
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
        assert bench.results_table(results) in printed
        assert (tmp_path / "figures" / f"{name}-curves.png").exists()
        assert (tmp_path / "figures" / f"{name}-dfm.png").exists()
    with open(tmp_path / "results" / "gp1d.json") as f:  # the oracle is also scored window by window, as DFM samples
        assert "signal_by_window" in json.load(f)["summary"]["oracle"]


def test_the_readmes_result_tables_are_their_results_files():
    """Every block `<!-- results NAME -->` of the README is the table of assets/results/NAME.json, number for
    number, and every results file has its block: a hand-edited or stale table fails here."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    results_dir = os.path.join(ROOT, "assets", "results")
    names = sorted(f[:-len(".json")] for f in os.listdir(results_dir)) if os.path.isdir(results_dir) else []
    assert sorted(match.group(2) for match in bench.BLOCK.finditer(text)) == names
    studies_dir = os.path.join(ROOT, "assets", "studies")
    studies = sorted(f[:-len(".json")] for f in os.listdir(studies_dir) if f.endswith(".json"))
    assert sorted(match.group(2) for match in bench.STUDY_BLOCK.finditer(text)) == studies
    assert bench.readme_with_tables(text, results_dir, studies_dir) == text, "run: python -m experiments.bench --readme"


def test_a_hand_edited_study_table_is_caught_and_rewritten():
    """One digit changed in a study's table of the README makes it differ from its file; --readme restores it."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = next(bench.STUDY_BLOCK.finditer(text))
    row = next(line for line in block.group(3).splitlines() if line.startswith("| ") and line[2].isdigit())
    edited = text.replace(row, row.replace("| ", "| 9", 1), 1)
    results_dir, studies_dir = os.path.join(ROOT, "assets", "results"), os.path.join(ROOT, "assets", "studies")
    assert edited != text and bench.readme_with_tables(edited, results_dir, studies_dir) == text


def test_a_readme_block_is_rewritten_from_its_results_file(tmp_path):
    results = {"problem": "toy", "columns": ["d", "train ms/step"], "seeds": [0, 1],
               "settings": {"steps": 5, "batch_size": 2},
               "machine": {"cpu": "x86_64", "cpus": 2, "threads": 1, "device": "cpu", "torch": "2.14.1"},
               "summary": {**{k: {"d": {"mean": 0.5, "sd": 0.25}, "train ms/step": {"mean": 10.0, "sd": 1.0}}
                              for k in bench.KINDS}, "floor": {"d": {"mean": 0.125, "sd": None}}},
               "ratios": {"dfm/oracle": {"d": {"mean": 1.0, "sd": 0.0}},
                          "dfm/deterministic": {"d": {"mean": 2.0, "sd": 0.5}}}}
    (tmp_path / "toy.json").write_text(json.dumps(results))
    stale = "intro\n<!-- results toy: made by experiments/bench.py -->\n| dfm | 0.4999 |\n<!-- /results -->\nafter\n"
    new = bench.readme_with_tables(stale, str(tmp_path))
    assert new.startswith("intro\n<!-- results toy: made by experiments/bench.py -->\n") and new.endswith("<!-- /results -->\nafter\n")
    assert "| dfm | 0.5000 ± 0.2500 | 10.0 ± 1.0 |" in new
    assert "| floor (exact vs exact) | 0.1250 | - |" in new
    assert "| dfm / deterministic | 2.00 ± 0.50 |" in new
    assert bench.readme_with_tables(new, str(tmp_path)) == new


def test_speed_times_the_readmes_training_command_and_tabulates_medians(monkeypatch, capsys, tmp_path):
    """--speed runs train.py in fresh processes (the wait policy is read when torch loads) and the table shows
    each setting's median and range, the load averages, and the default budget's time."""
    assert bench.train_ms_per_step("gan_inversion", 2, {"OMP_NUM_THREADS": "1"}) > 0  # a real run, parsed
    fake = iter(range(1, 100))
    monkeypatch.setattr(bench, "train_ms_per_step", lambda name, steps, environment: float(next(fake)))
    monkeypatch.setattr(sys, "argv", ["experiments/bench.py", "--speed", "--seeds", "3", "--results", str(tmp_path)])
    bench.main()
    with open(tmp_path / "speed.json") as f:
        results = json.load(f)
    n = len(bench.SPEED_SETTINGS)
    first = results["ms_per_step"][bench.ALL[0]]  # repetitions in rotation: 1, then 1 + 4n, then 1 + 8n
    assert first[bench.SPEED_SETTINGS[0][0]] == [1.0, 1.0 + len(bench.ALL) * n, 1.0 + 2 * len(bench.ALL) * n]
    steps = toy_problems.load(bench.ALL[0]).TRAIN_DEFAULTS["steps"]
    median = 1.0 + len(bench.ALL) * n
    assert f"| {bench.ALL[0]} | {median:.1f} (1.0-{1.0 + 2 * len(bench.ALL) * n:.1f}) |" in bench.speed_table(results)
    assert f"{median * steps / 60000:.1f} min |" in bench.speed_table(results).splitlines()[4]
    assert "load average (1, 5, 15 min)" in capsys.readouterr().out
