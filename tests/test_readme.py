"""The README can be followed as written: its install commands are complete and install what
requirements.txt pins, and its notebook list covers every notebook; notebooks/time_notebook.py times one."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_the_cpu_install_command_is_complete_and_installs_the_pinned_pair():
    pins = dict(line.split("==") for line in read("requirements.txt").splitlines() if "==" in line)
    commands = [line for line in read("README.md").splitlines() if line.startswith("pip install")]
    assert commands and not any("<" in c or ">" in c for c in commands), commands  # no placeholder left
    assert (f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']} "
            "--index-url https://download.pytorch.org/whl/cpu") in commands  # PyTorch's own CPU wheel index


def test_the_notebook_list_names_every_notebook():
    section = read("README.md").split("\n## Notebooks\n")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `(\w+\.ipynb)` \|", section, re.M)
    notebooks = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))
    assert sorted(listed) == notebooks


def test_the_notebook_timer_reports_each_cells_wall_and_cpu_time_and_leaves_the_notebook_alone(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    busy = "x = sum(i * i for i in range(5 * 10 ** 6))"
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# a title"), nbformat.v4.new_code_cell(busy),
        nbformat.v4.new_code_cell(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {busy!r}])")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "tiny.ipynb")
    before = (tmp_path / "tiny.ipynb").read_text()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "notebooks", "time_notebook.py"), tmp_path / "tiny.ipynb"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "DFM_FAST": ""})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    cells = [re.fullmatch(r"tiny\.ipynb cell (\d): wall ([\d.]+) s, cpu ([\d.]+) s \(load average [\d.]+\)", line)
             for line in lines[:-1]]
    assert [m[1] for m in cells] == ["1", "2"]  # the code cells, by their index
    assert float(cells[1][3]) > 0  # the subprocess's CPU time counts too
    assert re.fullmatch(r"tiny\.ipynb: wall [\d.]+ min, cpu [\d.]+ min \(full mode, load average .*\)", lines[-1])
    assert (tmp_path / "tiny.ipynb").read_text() == before
