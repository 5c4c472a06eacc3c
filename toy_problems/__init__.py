"""Toy forward-model problems whose exact posterior we know.

Every problem is one module with the same parts, so that train.py, sample.py and bench.py
treat them alike:

    TRAIN_DEFAULTS                       dict(steps=..., batch_size=..., lr=...) for train.py
    sample_batch(batch_size, generator, device="cpu") -> dict of tensors:
        ctxt_obs (B, Nc, *obs_shape), ctxt_params (B, Nc, *param_shape),
        trgt_obs (B, *obs_shape),     trgt_params (B, *param_shape),
        novel_obs, novel_params       (a second target of the same signal; optional),
        signal (B, *signal_shape)     (the ground truth; only the oracle may look at it)
    forward(signal, params) -> obs     the known, differentiable forward model
    make_denoiser(kind) -> nn.Module   kind is "dfm", "deterministic" or "oracle"
    exact_posterior(ctxt_obs, ctxt_params, n_samples, generator) -> (B, n_samples, *signal_shape)
    evaluate(model, kind, seed=0, n_contexts=..., n_samples=..., steps=...) -> dict of scores
    plot(model, kind, path, seed=0)      saves a PNG figure of samples against the exact posterior
"""
import importlib

PROBLEMS = ["gp1d", "flatland", "motion", "gan_inversion"]


def load(name):
    """The module of a toy problem, by name."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}: expected one of {', '.join(PROBLEMS)}")
    return importlib.import_module(f"toy_problems.{name}")
