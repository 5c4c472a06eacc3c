"""The experiments: benchmarks against exact posteriors, the studies, the 3D diagnostics and the GPU check.

Each is a command run from the repository root as `python -m experiments.NAME`, which imports this package
first: the place to set what must be set before torch loads."""
import os

# Before torch loads: idle OpenMP threads spin (fastest) if the machine is idle as the command starts, else sleep,
# because spinning threads take the time that their descheduled siblings need (RESULTS.md, Speed); a system
# without a load average (Windows) gets the safe choice, sleep
load_average = getattr(os, "getloadavg", lambda: (float("inf"),))()[0]
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if load_average < 0.5 else "PASSIVE")
