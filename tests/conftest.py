import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: fast on a busy machine (RESULTS.md, Speed)
os.environ["DFM_NO_DOWNLOAD"] = "1"  # LPIPS weights are never fetched by a test (toy_problems/metrics.py)
# ... nor read from the user's cache: every test, and every process a test starts, sees this empty folder, so
# the same checkout gives the same results whatever the user has fetched before (no real LPIPS in the tests)
os.environ["DFM_LPIPS_CACHE"] = tempfile.mkdtemp(prefix="dfm-tests-lpips-")
atexit.register(shutil.rmtree, os.environ["DFM_LPIPS_CACHE"], ignore_errors=True)

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project is a flat directory of modules: make them importable from the tests.
sys.path.insert(0, ROOT)


@pytest.fixture
def run_notebook(monkeypatch, tmp_path):
    """Execute notebooks/<name> top to bottom, as a student would, in fast mode (DFM_FAST=1:
    a few seconds of training per model), and return it with its outputs. A failing cell fails the
    test. The kernel's temporary folders (tempfile.mkdtemp) go under pytest's tmp_path, so a failed
    run leaves nothing in /tmp."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DFM_FAST", "1")  # the kernel inherits both
    monkeypatch.setenv("TMPDIR", str(tmp_path))

    def run(name, switch=None):
        """switch: (old, new) to replace in the notebook's sources before it runs, e.g. its TRAIN switch."""
        notebook = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
        if switch is not None:
            found = [cell for cell in notebook.cells if switch[0] in cell.source]
            assert len(found) == 1, f"{name}: {switch[0]!r} is in {len(found)} cells, expected 1"
            found[0].source = found[0].source.replace(switch[0], switch[1])
        return nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                       resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()

    return run


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(module, *args): module.main() with these command-line arguments -> (exit status, stdout, stderr)."""
    def call(module, *args):
        monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *map(str, args)])
        try:
            module.main()
            code = 0
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return call
