"""The first lesson with its exercises solved: notebooks/dfm_from_scratch.ipynb with the sections of
dfm_from_scratch.py (beside this file) in place of its exercise cells.

    python notebooks/solutions/solve.py out/lesson-solved.ipynb             # for a teacher: the solved notebook
    python notebooks/solutions/solve.py out/lesson-solved.ipynb --execute   # run it top to bottom, timed

--execute runs it in full mode (DFM_FAST=1 in the environment: the tests' fast mode), one cell
after another with a progress bar, and writes the notebook with its outputs. It prints how long
that took and how much CPU time the kernel used: on a machine shared with other jobs the wall
time says little, and with one thread (OMP_NUM_THREADS=1) the CPU time is about what the run
takes on a quiet one. tests/test_lesson.py runs the same solutions.
"""
import argparse
import os
import re
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = os.path.dirname(HERE)
LESSON = os.path.join(NOTEBOOKS, "dfm_from_scratch.ipynb")


def solutions():
    """The solved exercise cells, by tag: {"exercise-1": source, ...}, from the `# %% exercise-N` sections."""
    with open(os.path.join(HERE, "dfm_from_scratch.py")) as f:
        parts = re.split(r"^# %% (exercise-\d+)\n", f.read(), flags=re.M)
    return {tag: source.strip() for tag, source in zip(parts[1::2], parts[2::2])}


def solved_lesson():
    """The lesson as an nbformat notebook, every cell tagged exercise-N replaced by its solution."""
    import nbformat
    notebook = nbformat.read(LESSON, as_version=4)
    solved = solutions()
    for cell in notebook.cells:
        for tag in cell.metadata.get("tags", []):
            if tag in solved:
                cell.source = solved[tag]
    return notebook


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="where to write the solved notebook: a new .ipynb file (an existing one is "
                                    "never replaced; its folder is made if needed)")
    parser.add_argument("--execute", action="store_true",
                        help="run it top to bottom first (full mode unless DFM_FAST=1) and print the time it took "
                             "(default: write it without outputs)")
    args = parser.parse_args()
    if not args.out.endswith(".ipynb"):
        parser.error(f"out must be a notebook file ending in .ipynb, got {args.out!r}")
    if os.path.exists(args.out):
        parser.error(f"{args.out!r} exists; give a new path (nothing is overwritten)")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    except OSError as e:
        parser.error(f"cannot make the folder of {args.out!r} ({e.strerror})")
    import nbformat
    notebook = solved_lesson()
    if args.execute:
        import nbclient
        from tqdm import tqdm
        client = nbclient.NotebookClient(notebook, timeout=None, kernel_name="python3",
                                         resources={"metadata": {"path": NOTEBOOKS}})
        started = time.perf_counter()
        with client.setup_kernel():
            code = [(index, cell) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
            for index, cell in tqdm(code, desc="cells", unit="cell"):
                client.execute_cell(cell, index)
        wall = time.perf_counter() - started
        kernel = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel, shut down and waited for by now
        mode = "fast" if os.environ.get("DFM_FAST") == "1" else "full"
        cpu = kernel.ru_utime + kernel.ru_stime
        print(f"ran top to bottom in {wall:.0f} s, the kernel using {cpu:.0f} s of CPU time "
              f"({mode} mode, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    nbformat.write(notebook, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
