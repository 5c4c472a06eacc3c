"""The experiments: benchmarks against exact posteriors, the studies, the 3D diagnostics and the GPU check.

Each is a command run from the repository root as `python -m experiments.NAME`, which imports this package
first: the place to set what must be set before torch loads."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep, not spin: fast on a busy machine
