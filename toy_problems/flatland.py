"""Flatland, the learned problem: DFM samples 2D scenes of discs from one 1D view.

The world (discs, cameras, exact rendering, the prior and its exact posterior) lives in
toy_problems/flatland_world.py; this file is what a model learns and how it is scored.

The signal that the denoisers predict (and the oracle diffuses) is a 2D field on a 32x32
grid over the square, 4 channels in [-1, 1]: occupancy and RGB colour. A fixed-shape grid
rather than a set of discs, so the oracle is plain image diffusion on the scene itself with
the same conditioning as DFM, and exact posterior samples are compared with model samples
as rasterised scenes rendered by the same `forward`. `forward` volume-renders the grid with
render.py (density = SIGMA_MAX * occupancy). The denoiser lifts the 1D views into the plane
with render.lookup (pixel-aligned features, as pixelNeRF does in 3D) and a small UNet turns
them into the field.
"""
import math
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import dfm
import render
import toy_problems
from toy_problems.flatland_world import (CONTEXT_ANGLE, GRID, WORLD, cameras, camera_rays, pixel_labels, rasterize,
                                         render_discs, sample_discs)
from toy_problems.flatland_world import exact_posterior  # noqa: F401  (part of every problem's interface)

SIGMA_MAX = 40.0  # density of a fully occupied cell, per unit length
N_SAMPLES = 64  # samples per ray of the volume renderer
N_PROBES = 8  # a ring of probe cameras for scoring
VIEWS_IN_TURN = 3  # views DFM samples one after another after the target view (draw_samples)
MAX_CONTEXTS = 3  # a training example has 1..MAX_CONTEXTS context views (sample_batch)
SIGNAL_SHAPE = (4, GRID, GRID)

TRAIN_DEFAULTS = dict(steps=2000, batch_size=32, lr=1e-3)


# -----------------------------------------------------------------------------
# Data and the forward model


def grid_field(signal):
    """The signal as a field for render.py: points (B, R, S, 2) -> sigma (B, R, S), rgb (B, R, S, 3), bilinear."""
    def field(points):
        values = F.grid_sample(signal, points, align_corners=False, padding_mode="border")  # (B, 4, R, S)
        values = ((values + 1) / 2).clamp(0, 1)
        return SIGMA_MAX * values[:, 0], values[:, 1:].permute(0, 2, 3, 1)
    return field


def forward(signal, params, n_samples=N_SAMPLES):
    """Volume-render the field with render.py: signal (B, 4, GRID, GRID), params (B, ...) -> obs (B, 3, W)."""
    origins, dirs = camera_rays(params)  # (B, W, 2)
    near, far = render.intersect_box(origins, dirs, -1.0, 1.0)  # (B, W)
    out = render.render_rays(grid_field(signal), origins, dirs, near, far, n_samples)  # black background
    return 2 * out["rgb"].transpose(1, 2) - 1  # (B, 3, W)


def render_views(discs, params):
    """Exact views of scenes from several cameras each: discs (B, M, 6), params dict of (B, V, ...) -> (B, V, 3, W)."""
    return torch.stack([render_discs(discs, {k: v[:, i] for k, v in params.items()})
                        for i in range(params["K"].shape[1])], dim=1)


def context_angles(batch_size, n_ctxt, generator):
    """Angles of the context cameras: the context camera first, then n_ctxt - 1 random ones -> (B, Nc)."""
    return torch.cat([torch.full((batch_size, 1), CONTEXT_ANGLE),
                      torch.rand(batch_size, n_ctxt - 1, generator=generator) * 2 * math.pi], dim=1)


def sample_batch(batch_size, generator, device="cpu", n_ctxt=None):
    """Scenes from the prior, seen from the context camera and from two random cameras (target, novel).

    n_ctxt > 1 adds context views from random cameras (drawn after everything else, so the
    scenes, targets and first context view are the same for every n_ctxt). Unless given, Nc is
    drawn from 1..MAX_CONTEXTS: the contexts that sampling views in turn conditions on (draw_samples).
    """
    if n_ctxt is None:
        n_ctxt = int(torch.randint(1, MAX_CONTEXTS + 1, (), generator=generator))
    discs = sample_discs(batch_size, generator)  # (B, M, 6)
    angles = torch.rand(batch_size, 2, generator=generator) * 2 * math.pi  # target, novel
    ctxt_params = cameras(context_angles(batch_size, n_ctxt, generator))  # (B, Nc, ...)
    trgt_params, novel_params = cameras(angles[:, 0]), cameras(angles[:, 1])
    batch = dict(ctxt_obs=render_views(discs, ctxt_params), ctxt_params=ctxt_params,
                 trgt_obs=render_discs(discs, trgt_params), trgt_params=trgt_params,
                 novel_obs=render_discs(discs, novel_params), novel_params=novel_params,
                 signal=rasterize(discs))
    return dfm.map_batch(lambda v: v.to(device), batch)


def held_out_batch(n_contexts, seed=0, device="cpu", n_ctxt=1):
    """Fixed evaluation contexts, from a seed stream that training never uses (n_ctxt views each)."""
    return sample_batch(n_contexts, toy_problems.held_out_generator(seed), device, n_ctxt)


def sample_views(n_signals, n_views, generator):
    """A fixed data set (train.py --signals/--views): scenes from the prior, each seen from the
    context camera (view 0) and n_views - 1 random cameras -> dict(signal (S, 4, G, G),
    obs (S, V, 3, W), params dict of (S, V, ...))."""
    discs = sample_discs(n_signals, generator)  # (S, M, 6)
    params = cameras(context_angles(n_signals, n_views, generator))  # (S, V, ...): the same cameras as contexts get
    return dict(signal=rasterize(discs), obs=render_views(discs, params), params=params)


def finite_batch(views, batch_size, generator, device="cpu"):
    """A batch from a fixed data set: the context camera's view, a target and (if V > 2) a novel view."""
    return toy_problems.finite_batch(views, batch_size, generator, n_ctxt=1, fixed_context=True, device=device)


FORWARD_ERRORS = ("focal", "pose")


def forward_with_error(kind, size):
    """A forward model whose cameras are off (study 2 of experiments/study.py): `forward`, with every camera
    changed before rendering, as a miscalibrated camera would be.

    focal: the focal length is (1 + size) times the true one;
    pose:  a camera's angle around the circle, counted from the context camera, is (1 + size)
           times the true one (the context camera itself is where it should be).
    """
    if kind not in FORWARD_ERRORS:
        raise ValueError(f"unknown forward error {kind!r} for flatland: expected one of {', '.join(FORWARD_ERRORS)}")
    if not -1 < size < 1:
        raise ValueError(f"--forward-error-size for {kind} must be a relative error in (-1, 1), got {size}")

    def wrong(params):
        if kind == "focal":
            K = params["K"].clone()
            K[..., 0, 0] *= 1 + size
            return {**params, "K": K}
        position = params["c2w"][..., :2, 2]  # (..., 2)
        angle = torch.atan2(position[..., 1], position[..., 0]) - CONTEXT_ANGLE
        angle = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi  # in [-pi, pi): 0 at the context camera
        return {k: v.to(position.device) for k, v in cameras(CONTEXT_ANGLE + (1 + size) * angle.cpu()).items()}

    return lambda signal, params, n_samples=N_SAMPLES: forward(signal, wrong(params), n_samples)


def benchmark_render(batch_size=64, repeats=10, device="cpu"):
    """Rays per second through forward() (render.py on the grid field, N_SAMPLES per ray), forward and backward."""
    signal = torch.zeros(batch_size, *SIGNAL_SHAPE, device=device, requires_grad=True)
    params = {k: v.to(device) for k, v in cameras(torch.rand(batch_size) * 2 * math.pi).items()}
    forward(signal, params).sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        forward(signal, params).sum().backward()
    if device != "cpu":
        torch.cuda.synchronize()
    return batch_size * WORLD.n_pixels * repeats / (time.perf_counter() - start)


# -----------------------------------------------------------------------------
# The default denoiser: lift the views into the plane, then a small UNet


def lift(obs, params):
    """Back-project 1D images into the plane along their rays (2D pixel-aligned features).

    obs (B, V, 3, W), params dict of (B, V, ...) -> (B, V, 6, GRID, GRID): at every grid cell,
    the colour of the pixel whose ray passes through it (zero outside the view), an in-view
    mask, and the cell in that camera's frame (image coordinate, depth from the circle).
    """
    B, V = obs.shape[:2]
    coords = -1 + (torch.arange(GRID, device=obs.device) + 0.5) * 2 / GRID
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([x, y], dim=-1).view(1, GRID * GRID, 2).expand(B, -1, -1)  # (B, G*G, 2), row = y
    color, uv, depth, seen = render.lookup(obs, points, params["c2w"], params["K"])  # (B, V, G*G, 3), (.., 1), (..)
    geometry = torch.stack([seen.to(obs.dtype), 2 * uv[..., 0].clamp(0, 1) - 1, depth - WORLD.cam_dist], dim=-1)
    return torch.cat([color, geometry], dim=-1).transpose(2, 3).reshape(B, V, 6, GRID, GRID)


class Denoiser(nn.Module):
    """Lifted views -> 2D field (B, 4, GRID, GRID): a small UNet at 16x16 and 8x8, attention at 8x8.

    Input channels at every cell: the lifted context and noisy target views (6 each) and the
    cell's (x, y). The oracle gets the noisy field itself (4 channels) in place of the lifted
    noisy target view. 2x2 cells are folded into channels on the way in (pixel unshuffle) and
    the last layers upsample back, which keeps the network cheap enough for a laptop CPU.
    """

    def __init__(self, oracle=False, ch=32):
        super().__init__()
        self.oracle, self.ch = oracle, ch
        self.time = nn.Sequential(nn.Linear(ch, 2 * ch), nn.SiLU(), nn.Linear(2 * ch, 2 * ch))
        self.inp = nn.Conv2d(4 * (6 + (4 if oracle else 6) + 2), ch, 3, padding=1)  # 16x16
        self.enc = dfm.ResBlock2d(ch, 2 * ch)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)  # 8x8: every cell sees the whole square
        self.mid1, self.mid2 = dfm.ResBlock2d(2 * ch, 2 * ch), dfm.ResBlock2d(2 * ch, 2 * ch)
        self.attn = nn.MultiheadAttention(2 * ch, 4, batch_first=True)
        self.up = nn.Conv2d(3 * ch, ch, 3, padding=1)
        self.dec = dfm.ResBlock2d(ch, 2 * ch)
        self.out = nn.Sequential(nn.Conv2d(ch, ch // 2, 3, padding=1), nn.SiLU(), nn.Conv2d(ch // 2, 4, 3, padding=1))

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        B = ctxt_obs.shape[0]
        ctxt = lift(ctxt_obs, ctxt_params).mean(dim=1)  # (B, 6, G, G), averaged over contexts
        if self.oracle:
            trgt = noisy_trgt  # (B, 4, G, G), the noisy field
        else:
            trgt = lift(noisy_trgt.unsqueeze(1), {k: v.unsqueeze(1) for k, v in trgt_params.items()})[:, 0]
        coords = -1 + (torch.arange(GRID, device=ctxt.device) + 0.5) * 2 / GRID
        xy = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=0).expand(B, 2, GRID, GRID)
        temb = self.time(dfm.timestep_embedding(t, self.ch))  # (B, 2ch)
        x = F.pixel_unshuffle(torch.cat([ctxt, trgt, xy], dim=1), 2)  # (B, 4 * C_in, G/2, G/2)
        h1 = self.enc(self.inp(x), temb)  # (B, ch, 16, 16)
        h = self.mid1(self.down(h1), temb)  # (B, 2ch, 8, 8)
        tokens = h.flatten(2).transpose(1, 2)  # (B, 64, 2ch)
        h = h + self.attn(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(h.shape)
        h = self.mid2(h, temb)
        h = self.dec(self.up(torch.cat([F.interpolate(h, scale_factor=2), h1], dim=1)), temb)  # (B, ch, 16, 16)
        h = F.interpolate(F.silu(h), scale_factor=2)  # (B, ch, G, G)
        return torch.tanh(self.out(h))  # (B, 4, G, G) occupancy and colour in [-1, 1]


def make_denoiser(kind):
    return Denoiser(oracle=(kind == "oracle"))


# -----------------------------------------------------------------------------
# Scores and pictures


def probe_views(signals):
    """Render fields from the ring of probe cameras: (B, n, 4, G, G) -> (B, n, N_PROBES, 3, W)."""
    B, n = signals.shape[:2]
    params = cameras(torch.arange(N_PROBES) * 2 * math.pi / N_PROBES + CONTEXT_ANGLE)  # (P, ...)
    params = {k: v.to(signals.device).repeat(B * n, 1, 1) for k, v in params.items()}  # (B*n*P, ...)
    views = forward(signals.flatten(0, 1).repeat_interleave(N_PROBES, dim=0), params)  # (B*n*P, 3, W)
    return views.view(B, n, N_PROBES, 3, -1)


def disc_centers(signals, labels):
    """Read each context-visible disc's centre off fields: the opacity-weighted centroid of the cells of its colour.

    signals (n, 4, G, G), labels (W,) of the context -> (n, 2 * number of visible colours).
    A field with no cell of a colour gets (0, 0) for that disc.
    """
    coords = -1 + (torch.arange(GRID, device=signals.device) + 0.5) * 2 / GRID
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    occupancy, color = ((signals + 1) / 2).clamp(0, 1).flatten(2).split([1, 3], dim=1)  # (n, 1, G*G), (n, 3, G*G)
    alpha = 1 - torch.exp(-SIGMA_MAX * occupancy[:, 0] * 2 / GRID)  # (n, G*G) opacity of each cell
    palette = torch.tensor(WORLD.palette, device=signals.device)
    nearest = (color.transpose(1, 2)[..., None, :] - palette).norm(dim=-1).argmin(-1)  # (n, G*G)
    centers = []
    for c in sorted(set(labels[labels >= 0].tolist())):
        w = alpha * (nearest == c)  # (n, G*G)
        total = w.sum(1).clamp(min=1e-6)
        centers += [(w * x.flatten()).sum(1) / total, (w * y.flatten()).sum(1) / total]
    return torch.stack(centers, dim=1)  # (n, 2V)


def psnr(a, b):
    """PSNR of observations in [-1, 1] (peak-to-peak 2), from the mean squared error over everything.
    Identical sets (every exact sample is the true scene) give 106 dB, not a division by zero."""
    return 10 * math.log10(4 / max(((a - b) ** 2).mean().item(), 1e-10))


def draw_samples(model, batch, n_samples, generator, steps, views_in_turn=VIEWS_IN_TURN, **sample_kwargs):
    """n_samples fields per context of the batch: (B, n, 4, G, G). sample_kwargs go to model.sample
    (guidance, temperature, sampler, eta).

    DFM samples the target view, then views_in_turn more views from cameras evenly spaced around
    the ring, each one added to the context (DFM.sample_autoregressive); the scene is the one
    behind the last view. One view leaves the far side of a scene loosely constrained, so a single
    sampled view commits to less than a whole scene; each view in turn narrows the scene down to
    one that all the views agree on. The oracle samples the scene itself, at once, and the
    deterministic model makes its one prediction from the context (fed its own predictions as
    views, it only compounds their blur)."""
    model.eval()
    if model.kind != "dfm" or views_in_turn == 0:
        return dfm.sample_signals(model, batch, n_samples, generator, steps, **sample_kwargs)  # (B, n, 4, G, G)
    B = batch["ctxt_obs"].shape[0]
    ctxt_obs, ctxt_params, trgt_params = (dfm.repeat_batch(batch[k], n_samples)
                                          for k in ("ctxt_obs", "ctxt_params", "trgt_params"))
    ring = cameras(CONTEXT_ANGLE + torch.arange(1, views_in_turn + 1) * 2 * math.pi / (views_in_turn + 1))  # (K, ...)
    turns = [{k: v[i].to(ctxt_obs.device).expand(B * n_samples, *v.shape[1:]) for k, v in ring.items()}
             for i in range(views_in_turn)]  # K camera params, each (B * n, ...)
    signal, _ = model.sample_autoregressive(ctxt_obs, ctxt_params, [trgt_params] + turns, steps=steps,
                                            generator=generator, **sample_kwargs)
    return signal.view(B, n_samples, *signal.shape[1:])  # (B, n, 4, G, G)


def spread(views):
    """How different a context's samples are from each other: the mean distance between the probe
    views of two of them, E|X - X'| (B, n, P, 3, W) -> a number. 0 when every sample is the same scene."""
    x = views.flatten(2).double()  # (B, n, D)
    return torch.cdist(x, x).mean().item() * x.shape[1] / (x.shape[1] - 1)  # pairs of distinct samples only


def evaluate(model, seed=0, n_contexts=16, n_samples=32, steps=50, n_ctxt=1, views_in_turn=VIEWS_IN_TURN,
             **sample_kwargs):
    """Scores against the exact posterior (lower is better), each with its floor, and pixel scores.

    views:    energy distance between the renders of model and exact samples from a ring of
              N_PROBES cameras (all rendered by the same `forward`, the exact ones rasterised).
    position: energy distance between the centres of the disc(s) seen in the first context view,
              read off the fields.
    *_floor:  the same distance between two independent sets of exact samples.
    psnr:     of sample renders against the true scene's (higher is better; the conditional
              mean, i.e. the deterministic model, is expected to win it). psnr_exact: exact samples.
    spread:   how different a context's samples are from each other (spread_exact: the posterior's).
    n_ctxt:   context views per held-out scene (the first from the context camera, the others random).
    views_in_turn: views sampled after the target view before the scene is read off (draw_samples).
    sample_kwargs go to model.sample (guidance, temperature, sampler, eta).
    """
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device, n_ctxt)
    samples = draw_samples(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps,
                           views_in_turn, **sample_kwargs)
    cpu = torch.Generator().manual_seed(seed)
    exact_a = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, cpu)
    exact_b = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, cpu)
    views = {name: probe_views(s) for name, s in (("model", samples), ("a", exact_a), ("b", exact_b))}
    truth = probe_views(batch["signal"][:, None])  # (B, 1, P, 3, W)
    labels = pixel_labels(batch["ctxt_obs"][:, 0].cpu())  # (B, W)

    def position(x, y):
        return torch.stack([dfm.energy_distance(disc_centers(x[b], labels[b])[None],
                                                disc_centers(y[b], labels[b])[None])
                            for b in range(n_contexts)]).mean().item()

    return {"views": dfm.energy_distance(views["model"], views["a"]).mean().item(),
            "views_floor": dfm.energy_distance(views["b"], views["a"]).mean().item(),
            "position": position(samples, exact_a), "position_floor": position(exact_b, exact_a),
            "psnr": psnr(views["model"], truth), "psnr_exact": psnr(views["a"], truth),
            "spread": spread(views["model"]), "spread_exact": spread(views["a"])}


def top_down(signal):
    """A field seen from above: (4, G, G) -> (G, G, 3), each cell's colour times its opacity, black background."""
    occupancy, color = ((signal + 1) / 2).clamp(0, 1).split([1, 3])
    alpha = 1 - torch.exp(-SIGMA_MAX * occupancy * 2 / GRID)  # opacity across one cell of the signal grid
    return (alpha * color).permute(1, 2, 0).cpu().numpy()


def strip(views):
    """1D views as an image, one row per camera: (P, 3, W) -> (P, W, 3)."""
    return ((views.clamp(-1, 1) + 1) / 2).permute(0, 2, 1).cpu().numpy()


def plot(model, path, seed=0, n_contexts=3, n_samples=4, steps=50, views_in_turn=VIEWS_IN_TURN):
    """For each context: the true scene, exact posterior samples and model samples, seen from above,
    each with its views from the ring of probe cameras as strips underneath (first row: the context camera)."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    samples = draw_samples(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps,
                           views_in_turn)
    exact = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, torch.Generator().manual_seed(seed))
    cols = 1 + 2 * n_samples
    fig, axes = plt.subplots(2 * n_contexts, cols, figsize=(1.5 * cols, 2.3 * n_contexts),
                             gridspec_kw={"height_ratios": [3, 1] * n_contexts})
    for i in range(n_contexts):
        fields = torch.cat([batch["signal"][i:i + 1], exact[i], samples[i]])  # (1 + 2n, 4, G, G)
        views = probe_views(fields[None])[0]  # (1 + 2n, P, 3, W)
        for j in range(cols):
            axes[2 * i, j].imshow(top_down(fields[j]), origin="lower", extent=(-1, 1, -1, 1))
            axes[2 * i, j].plot([0], [-1], marker="^", color="white", markersize=6, clip_on=False)  # context camera
            axes[2 * i + 1, j].imshow(strip(views[j]), aspect="auto", interpolation="nearest")
            if i == 0:
                axes[0, j].set_title("truth" if j == 0 else "exact" if j <= n_samples else model.kind, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"flatland, {model.kind}: scenes from above given the view from the white camera; "
                 "strips: views from a ring of cameras", fontsize=9)
    fig.tight_layout()
    toy_problems.save_figure(fig, path)


def animate(model, path, seed=0, index=0, n_frames=36, steps=50, views_in_turn=VIEWS_IN_TURN):
    """A GIF of a camera going around one sampled scene (for held-out context `index`): the scene from
    above and the camera's 1D view."""
    from matplotlib.animation import FuncAnimation
    device = next(model.parameters()).device
    batch = held_out_batch(index + 1, seed, device)
    batch = dfm.map_batch(lambda v: v[index:], batch)
    signal = draw_samples(model, batch, 1, torch.Generator(device=device).manual_seed(seed), steps,
                          views_in_turn)[0]  # (1, 4, G, G)
    angles = CONTEXT_ANGLE + torch.arange(n_frames) * 2 * math.pi / n_frames
    params = {k: v.to(device) for k, v in cameras(angles).items()}
    views = forward(signal.expand(n_frames, -1, -1, -1), params)  # (F, 3, W)
    fig, (ax, ax_view) = plt.subplots(2, 1, figsize=(3, 3.6), gridspec_kw={"height_ratios": [5, 1]})
    ax.imshow(top_down(signal[0]), origin="lower", extent=(-1, 1, -1, 1))
    ax.set_xlim(-3, 3), ax.set_ylim(-3, 3), ax.set_xticks([]), ax.set_yticks([])
    camera, = ax.plot([], [], marker="o", color="tab:orange")
    frustum, = ax.plot([], [], color="tab:orange", lw=0.8)
    image = ax_view.imshow(strip(views[:1]), aspect="auto", interpolation="nearest")
    ax_view.set_xticks([]), ax_view.set_yticks([])
    ax.set_title(f"flatland, {model.kind} sample", fontsize=9)

    def frame(k):
        pos = params["c2w"][k, :2, 2].cpu()
        origins, dirs = camera_rays({n: v[k:k + 1].cpu() for n, v in params.items()})
        ends = origins[0, [0, -1]] + 3.5 * dirs[0, [0, -1]]  # the outermost rays
        camera.set_data([pos[0]], [pos[1]])
        frustum.set_data([ends[0, 0], pos[0], ends[1, 0]], [ends[0, 1], pos[1], ends[1, 1]])
        image.set_data(strip(views[k:k + 1]))
        return camera, frustum, image

    toy_problems.save_animation(fig, FuncAnimation(fig, frame, frames=n_frames, blit=True), path)
