"""The experiments: benchmarks against exact posteriors, the studies, the 3D diagnostics and the GPU check.

Each is a command run from the repository root as `python -m experiments.NAME`."""
