"""The first lesson, notebooks/dfm_from_scratch.ipynb: with the solutions in place of its exercise
cells it runs top to bottom (fast mode), and every exercise's check fails on the cell as handed
out and on a typical wrong answer, with a message that names the exercise."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")

# One typical mistake per exercise; each is a whole exercise cell.
WRONG = {
    "exercise-1": '''
def cosine_schedule(T, s=0.008):  # right (dfm.py's own), so that the check reaches add_noise
    return dfm.schedule(T)["abar"]

def add_noise(x0, t, eps, abar):  # variances where the standard deviations belong
    a = abar[t].view(-1, 1)
    return a * x0 + (1 - a) * eps
''',
    "exercise-2": '''
def dfm_loss(denoiser, forward, abar, batch, t, eps):  # the loss in signal space, against the hidden signal
    noisy_trgt = add_noise(batch["trgt_obs"], t, eps, abar)
    signal = denoiser(batch["ctxt_obs"], batch["ctxt_params"], noisy_trgt, batch["trgt_params"], t)
    return F.mse_loss(signal, batch["signal"])
''',
    "exercise-3": '''
def ddim_sample(denoiser, forward, abar, ctxt_obs, ctxt_params, trgt_params, x, steps):
    ts = torch.linspace(len(abar) - 1, 0, steps).round().long().tolist()
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        a_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        signal = denoiser(ctxt_obs, ctxt_params, x, trgt_params, torch.full((x.shape[0],), t))
        x0 = forward(signal, trgt_params)
        eps = (x - a_prev.sqrt() * x0) / (1 - a_prev).clamp(min=1e-8).sqrt()  # the noise level of the wrong step
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return signal, forward(signal, trgt_params)
''',
    "exercise-4": '''
def shifted_forward(signal, params):  # one point to the left
    return gp1d.forward(signal, (params[:, :1] - 1).clamp(min=0))
''',
}

# What each check must say when it fails on WRONG (on the unsolved cell it names the exercise).
MISMATCH = {
    "exercise-1": "Exercise 1: add_noise(x0, t, eps, abar) differs from dfm.py's",
    "exercise-2": "Exercise 2: dfm_loss differs from dfm.py's",
    "exercise-3": "Exercise 3: the signal that ddim_sample(..., steps=10) returns differs from dfm.py's",
    "exercise-4": "Exercise 4: shifted_forward differs from dfm.py's",
}


def load_solve():
    """notebooks/solutions/solve.py, the solutions' own tool, as a module."""
    spec = importlib.util.spec_from_file_location("solve", os.path.join(NOTEBOOKS, "solutions", "solve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


solutions = load_solve().solutions  # {"exercise-1": the solved cell's source, ...}


def test_every_exercise_has_a_solution_and_a_check():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, "dfm_from_scratch.ipynb"), as_version=4)
    tags = [tag for cell in notebook.cells for tag in cell.metadata.get("tags", [])]
    assert tags == ["exercise-1", "check-1", "exercise-2", "check-2", "exercise-3", "check-3", "exercise-4", "check-4"]
    assert sorted(solutions()) == sorted(WRONG) == [f"exercise-{k}" for k in range(1, 5)]


def test_the_lesson_runs_with_the_solutions_and_its_checks_catch_wrong_answers(monkeypatch, tmp_path):
    """One kernel, cell by cell, in fast mode (DFM_FAST=1; the kernel's temporary folders under tmp_path, as
    in conftest.run_notebook). Before each check passes with the solution, it must fail twice: on the
    exercise cell as handed out (NotImplementedError naming the exercise) and on the wrong answer above."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DFM_FAST", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    notebook = nbformat.read(os.path.join(NOTEBOOKS, "dfm_from_scratch.ipynb"), as_version=4)
    solved = solutions()
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})

    def run(source, index):
        client.execute_cell(nbformat.v4.new_code_cell(source), index)

    def stops(check, index):
        """The error that the check cell stops with, as "Name: message"."""
        with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
            run(check.source, index)
        return f"{error.value.ename}: {error.value.evalue}"

    handed_out, checked = {}, []
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            tag = (cell.metadata.get("tags") or [""])[0]
            if tag.startswith("exercise-"):
                handed_out[tag], cell.source = cell.source, solved[tag]
            if tag.startswith("check-"):
                number = tag[len("check-"):]
                exercise = f"exercise-{number}"
                run(handed_out[exercise], index)
                assert f"NotImplementedError: exercise {number}: write" in stops(cell, index)
                run(WRONG[exercise], index)
                assert MISMATCH[exercise] in stops(cell, index)
                run(solved[exercise], index)
            if cell.cell_type == "code":
                client.execute_cell(cell, index)  # a failing cell raises CellExecutionError: the test fails
            if tag.startswith("check-"):
                checked.append("".join(o.get("text", "") for o in cell.outputs))
    assert len(checked) == 4
    for number, printed in enumerate(checked, 1):  # each check said what it compared
        assert f"Exercise {number}:" in printed and "matches dfm.py" in printed
    assert not [name for name in os.listdir(tmp_path) if name.startswith("tmp")]  # the notebook removed its OUT folder


def test_solve_writes_the_solved_lesson_and_never_overwrites(tmp_path):
    solve = os.path.join(NOTEBOOKS, "solutions", "solve.py")
    out = tmp_path / "solved.ipynb"
    done = subprocess.run([sys.executable, solve, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "NotImplementedError" not in text and "def shifted_forward" in text
    again = subprocess.run([sys.executable, solve, str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists; give a new path" in again.stderr and out.read_text() == text
