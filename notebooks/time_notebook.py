"""Run a course notebook top to bottom, as a student would, and print how long each code cell took.

    OMP_NUM_THREADS=1 python notebooks/time_notebook.py notebooks/flatland.ipynb

Full mode unless DFM_FAST=1 is set. For every code cell it prints the wall time and the kernel's
CPU time, its own and that of the subprocesses it waited for. With one thread the CPU time is
about what the cell takes on an idle core, so it is the number to quote when the machine is busy.
The notebook file is not changed.
"""
import argparse
import os
import time

import nbclient
import nbformat

# run in the kernel after every cell: its CPU seconds so far, children included
CPU_SECONDS = ("import resource as _r\n"
               "print(sum(getattr(_r.getrusage(w), f) for w in (_r.RUSAGE_SELF, _r.RUSAGE_CHILDREN) "
               "for f in ('ru_utime', 'ru_stime')))")


def main():
    parser = argparse.ArgumentParser(prog="python notebooks/time_notebook.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("notebook", help="the .ipynb file to run; it runs in its own folder, as Jupyter would")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds one cell may take (default: 7200)")
    args = parser.parse_args()
    notebook = nbformat.read(args.notebook, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=args.timeout, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(os.path.abspath(args.notebook))}})
    cells = list(notebook.cells)
    probe = nbformat.v4.new_code_cell(CPU_SECONDS)
    notebook.cells.append(probe)  # a place of its own: nbclient stores each executed cell at its index

    def cpu_seconds():
        client.execute_cell(probe, len(cells))
        return float(probe.outputs[-1]["text"])

    name, start, load = os.path.basename(args.notebook), time.time(), []
    with client.setup_kernel():
        cpu_start = before = cpu_seconds()
        for i, cell in enumerate(cells):
            if cell.cell_type != "code":
                continue
            began = time.time()
            client.execute_cell(cell, i)
            wall, now = time.time() - began, cpu_seconds()
            load.append(os.getloadavg()[0])
            print(f"{name} cell {i}: wall {wall:.1f} s, cpu {now - before:.1f} s (load average {load[-1]:.1f})",
                  flush=True)
            before = now
    wall, cpu = time.time() - start, before - cpu_start
    mode = "fast" if os.environ.get("DFM_FAST") == "1" else "full"
    print(f"{name}: wall {wall / 60:.1f} min, cpu {cpu / 60:.1f} min ({mode} mode, load average "
          f"{min(load, default=0):.1f} to {max(load, default=0):.1f})")


if __name__ == "__main__":
    main()
