"""The experiments: benchmarks against exact posteriors, the studies, the 3D diagnostics and the GPU check.

Each is a command run from the repository root as `python -m experiments.NAME`, which imports this package
first: the place to set what must be set before torch loads."""
import os

# Before torch loads, train.py's rule: idle OpenMP threads spin on an idle machine, sleep on a busy one
load_average = getattr(os, "getloadavg", lambda: (float("inf"),))()[0]
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if load_average < 0.5 else "PASSIVE")
