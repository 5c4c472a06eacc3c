"""Toy forward-model problems whose exact posterior we know.

Every problem is one module with the same parts, so that train.py, sample.py and bench.py
treat them alike:

    TRAIN_DEFAULTS                       any fields of train.Config this problem sets differently
    sample_batch(batch_size, generator, device="cpu") -> dict of tensors:
        ctxt_obs (B, Nc, *obs_shape), ctxt_params (B, Nc, *param_shape),
        trgt_obs (B, *obs_shape),     trgt_params (B, *param_shape),
        novel_obs, novel_params       (a second target of the same signal; optional),
        signal (B, *signal_shape)     (the ground truth; only the oracle may look at it)
    forward(signal, params) -> obs     the known, differentiable forward model
    make_denoiser(kind) -> nn.Module   kind is "dfm", "deterministic" or "oracle"
    held_out_batch(n_contexts, seed=0, device="cpu")   evaluation contexts, from the held-out stream
    exact_posterior(ctxt_obs, ctxt_params, n_samples, generator) -> (B, n_samples, *signal_shape)
    evaluate(model, seed=0, n_contexts=..., n_samples=..., steps=...) -> dict of scores
    plot(model, path, seed=0)          saves a PNG figure of samples against the exact posterior
(the model knows what it is: model.kind).

Random streams. Training step k on process r of a run with seed s draws its data from
train_generator(s, k, r); evaluation draws from held_out_generator(s). The two are seeded
with different integers for every (s, k, r), by construction (stream_seed), so held-out
contexts are never training examples' contexts unless two streams collide by chance.
"""
import importlib

import torch

PROBLEMS = ["gp1d", "flatland", "motion", "gan_inversion", "scenes3d", "scenes3d-64", "scenes3d-128"]


def load(name):
    """The module of a toy problem, by name (the three 3D problems are one module at three sizes)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}: expected one of {', '.join(PROBLEMS)}")
    if name.startswith("scenes3d"):
        return importlib.import_module("toy_problems.scenes3d").problem(name)
    return importlib.import_module(f"toy_problems.{name}")


SEED_BITS, STEP_BITS, RANK_BITS = 20, 32, 10


def stream_seed(stream, seed, step=0, rank=0):
    """One integer per (stream, seed, step, rank), distinct for every distinct tuple.

    The fields are packed into disjoint bits of a 63-bit integer (seed | step | rank | stream),
    so that the training stream (last bit 0) and the held-out stream (last bit 1) never share a
    seed, whatever the seed, step or number of processes.
    """
    streams = {"train": 0, "held_out": 1}
    if stream not in streams:
        raise ValueError(f"unknown stream {stream!r}: expected one of {', '.join(streams)}")
    for name, value, bits in (("seed", seed, SEED_BITS), ("step", step, STEP_BITS), ("rank", rank, RANK_BITS)):
        if not 0 <= value < 2 ** bits:
            raise ValueError(f"{name} must be in [0, 2^{bits}), got {value}")
    return (((seed << STEP_BITS | step) << RANK_BITS | rank) << 1) | streams[stream]


def train_generator(seed, step, rank=0):
    """The generator of training step `step` on process `rank`."""
    return torch.Generator().manual_seed(stream_seed("train", seed, step, rank))


def held_out_generator(seed):
    """The generator of a problem's held-out evaluation contexts."""
    return torch.Generator().manual_seed(stream_seed("held_out", seed))
