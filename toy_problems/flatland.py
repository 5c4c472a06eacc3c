"""Flatland: inverse graphics one dimension down, a 2D world of discs seen by 1D cameras.

A scene is 1 to 3 discs with distinct colours from a small palette, radii from a small set
and centres on a fine lattice, none overlapping, inside the square [-1, 1]^2. Cameras sit on
a circle of radius 2.5 and look at the centre; each sees a 1D RGB image of W = 32 pixels,
rendered exactly (one ray per pixel centre, analytic ray-disc intersection, the nearest disc
wins, black background). As in the paper, poses are relative to the context camera, which
always sits at the bottom of the circle; targets are anywhere on it.

One view fixes each visible disc's direction and colour but not its depth: a nearer small
disc and a farther large one look alike, and a partly occluded disc may extend behind its
occluder; discs hidden behind others (or between pixel rays) are uncertain in everything.

The exact posterior is cheap because every constraint that a view puts on a scene involves
at most two discs (see `posterior_discs`): it is a tiny constraint problem that we count and
sample exactly with a few matrix products.

The signal that the denoisers predict (and the oracle diffuses) is a 2D field on a 32x32
grid over the square, 4 channels in [-1, 1]: occupancy and RGB colour. A fixed-shape grid
rather than a set of discs, so the oracle is plain image diffusion on the scene itself with
the same conditioning as DFM, and exact posterior samples are compared with model samples
as rasterised scenes rendered by the same `forward`. `forward` volume-renders the grid with
render.py (density = SIGMA_MAX * occupancy).
"""
import functools
import itertools
import math
import time
from dataclasses import dataclass

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import dfm
import render
import toy_problems


@dataclass(frozen=True)
class World:
    """The prior over scenes and the cameras; the default is WORLD, tests build tiny ones."""
    n_pixels: int = 32  # W, pixels of a 1D image
    lattice: int = 21  # disc centres on a lattice x lattice grid over [-(1 - r_max), 1 - r_max]^2
    radii: tuple = (0.2, 0.3)
    palette: tuple = ((0.9, 0.2, 0.2), (0.2, 0.8, 0.3), (0.25, 0.4, 0.95), (0.95, 0.85, 0.2))
    max_discs: int = 3  # the number of discs is uniform on 1..max_discs
    cam_dist: float = 2.5  # cameras on a circle of this radius
    half_fov_deg: float = 35.0  # enough to see the whole square from anywhere on the circle


WORLD = World()
CONTEXT_ANGLE = -math.pi / 2  # the context camera sits at (0, -cam_dist) and looks along +y
GRID = 32  # the signal: a GRID x GRID field over [-1, 1]^2
SIGMA_MAX = 40.0  # density of a fully occupied cell, per unit length
N_SAMPLES = 64  # samples per ray of the volume renderer
N_PROBES = 8  # a ring of probe cameras for scoring
SIGNAL_SHAPE = (4, GRID, GRID)

TRAIN_DEFAULTS = dict(steps=2000, batch_size=32, lr=1e-3)


# -----------------------------------------------------------------------------
# Cameras and exact rendering


def cameras(angles, world=WORLD):
    """Cameras on the circle looking at the centre: angles (...,) -> dict(c2w (..., 3, 3), K (..., 2, 2))."""
    pos = world.cam_dist * torch.stack([angles.cos(), angles.sin()], dim=-1)  # (..., 2)
    fwd = -pos / world.cam_dist  # the camera's z axis
    right = torch.stack([fwd[..., 1], -fwd[..., 0]], dim=-1)  # its x axis
    c2w = torch.zeros(*angles.shape, 3, 3)
    c2w[..., :2, 0], c2w[..., :2, 1], c2w[..., :2, 2], c2w[..., 2, 2] = right, fwd, pos, 1.0
    focal = 0.5 / math.tan(math.radians(world.half_fov_deg))  # normalised by the image width
    K = torch.tensor([[focal, 0.5], [0.0, 1.0]]).expand(*angles.shape, 2, 2).clone()
    return {"c2w": c2w, "K": K}


def camera_rays(params, world=WORLD):
    """One ray per pixel centre: params with c2w (..., 3, 3) -> origins, dirs (..., W, 2)."""
    return render.get_rays(params["c2w"], params["K"], render.pixel_centers(world.n_pixels, device=params["K"].device))


def ray_disc_hits(origins, dirs, centers, radii):
    """Distance along each ray to each disc's near surface, inf on a miss.

    origins, dirs (..., P, 2) with unit dirs; centers (..., Q, 2), radii (..., Q) -> (..., P, Q).
    """
    oc = centers[..., None, :, :] - origins[..., :, None, :]  # (..., P, Q, 2)
    b = (oc * dirs[..., :, None, :]).sum(-1)  # distance to the point of closest approach
    h2 = radii[..., None, :] ** 2 - ((oc * oc).sum(-1) - b * b)  # half-chord squared
    t = b - h2.clamp(min=0).sqrt()
    return torch.where((h2 > 0) & (t > 0), t, torch.full_like(t, math.inf))


def render_discs(discs, params, world=WORLD):
    """Exact 1D images: discs (B, M, 6) as (x, y, r, R, G, B), r = 0 if absent -> obs (B, 3, W) in [-1, 1]."""
    origins, dirs = camera_rays(params, world)  # (B, W, 2)
    t = ray_disc_hits(origins, dirs, discs[..., :2], discs[..., 2])  # (B, W, M)
    t_min, nearest = t.min(dim=-1)  # (B, W)
    color = discs[..., 3:].gather(1, nearest[..., None].expand(*nearest.shape, 3))  # (B, W, 3)
    color = torch.where(torch.isfinite(t_min)[..., None], color, torch.zeros_like(color))  # black background
    return (2 * color - 1).transpose(1, 2)  # (B, 3, W)


# -----------------------------------------------------------------------------
# The prior


def candidates(world=WORLD):
    """Every (x, y, r) a disc can take: (Q, 3), Q = lattice^2 * len(radii)."""
    side = torch.linspace(-1 + max(world.radii), 1 - max(world.radii), world.lattice, dtype=torch.float64)
    x, y, r = torch.meshgrid(side, side, torch.tensor(world.radii, dtype=torch.float64), indexing="ij")
    return torch.stack([x.flatten(), y.flatten(), r.flatten()], dim=-1).float()


def apart(a, b):
    """Do discs a (Qa, 3) and b (Qb, 3) not overlap? -> (Qa, Qb) bool. Touching counts as overlap."""
    return torch.cdist(a[:, :2].double(), b[:, :2].double()) > (a[:, None, 2] + b[None, :, 2]).double() + 1e-6


def sample_discs(batch_size, generator, world=WORLD):
    """Scenes from the prior: (B, M, 6) discs (x, y, r, R, G, B), r = 0 for absent discs.

    N ~ Uniform{1..M}, a uniformly random set of N palette colours, each disc's (x, y, r)
    uniform on the candidates, the whole scene redrawn until no two discs overlap.
    """
    cand, palette, M = candidates(world), torch.tensor(world.palette), world.max_discs
    discs = torch.zeros(batch_size, M, 6)
    todo = torch.arange(batch_size)
    while len(todo) > 0:
        n = len(todo)
        count = torch.randint(1, M + 1, (n,), generator=generator)  # (n,)
        colors = torch.rand(n, len(palette), generator=generator).argsort(dim=1)[:, :M]  # distinct colours
        pick = cand[torch.randint(0, len(cand), (n, M), generator=generator)]  # (n, M, 3)
        present = torch.arange(M) < count[:, None]  # (n, M)
        pick[..., 2] *= present
        d = torch.cdist(pick[..., :2].double(), pick[..., :2].double())  # (n, M, M), the same test as apart()
        clash = (d <= (pick[..., 2, None] + pick[..., None, 2]).double() + 1e-6) & present[:, :, None] & present[:, None, :]
        ok = ~(clash & ~torch.eye(M, dtype=torch.bool)).any(dim=(1, 2))
        discs[todo[ok]] = torch.cat([pick, palette[colors] * present[..., None]], dim=-1)[ok]
        todo = todo[~ok]
    return discs


@functools.lru_cache(maxsize=4)
def prior_counts(world=WORLD):
    """Z_N: the number of non-overlapping N-tuples of candidates, N = 1..max_discs (float64)."""
    O = apart(candidates(world), candidates(world)).double()  # (Q, Q)
    return [float(len(O)), O.sum().item(), ((O @ O) * O).sum().item()][:world.max_discs]


# -----------------------------------------------------------------------------
# The exact posterior


def pixel_labels(obs, world=WORLD):
    """Palette index of every pixel, -1 for background: obs (..., 3, W) -> (..., W) long."""
    color = ((obs + 1) / 2).transpose(-1, -2)  # (..., W, 3)
    dist = (color[..., None, :] - torch.tensor(world.palette, device=obs.device)).norm(dim=-1)  # (..., W, K)
    d_min, label = dist.min(dim=-1)
    background = color.norm(dim=-1) < 0.05
    if not torch.all(background | (d_min < 0.05)):
        raise ValueError("a context pixel is neither background nor a palette colour: not a flatland view")
    return torch.where(background, torch.full_like(label, -1), label)


def posterior_discs(ctxt_obs, ctxt_params, n_samples, generator, world=WORLD):
    """Exact samples of p(scene | context views) for one example.

    ctxt_obs (Nc, 3, W), ctxt_params dict of (Nc, ...) -> discs (n, M, 6).

    Colours are distinct, so every coloured pixel belongs to the one disc of that colour.
    A scene with colour set S renders to the views exactly when
      (unary)    the disc of colour c covers every pixel labelled c and no background pixel;
      (pairwise) no two discs overlap, and where a pixel is labelled c, every other disc that
                 the pixel's ray hits lies behind the disc of colour c.
    Nothing involves three discs. With a 0/1 matrix A_cd[i, j] of the pairwise test between
    candidates i (colour c) and j (colour d), the number of scenes that explain the views is
    n_c for S = {c}, sum A_cd for {c, d}, and sum((A_cd @ A_de) * A_ce) for {c, d, e}; the
    posterior of S is its prior weight times that count over Z_N, and given S we sample the
    discs one at a time from their exact conditionals.
    """
    if world.max_discs > 3:
        raise ValueError("posterior_discs counts scenes of up to 3 discs")
    labels = pixel_labels(ctxt_obs.cpu(), world).flatten()  # (Nc*W,)
    cand = candidates(world)  # (Q, 3)
    origins, dirs = camera_rays({k: v.cpu() for k, v in ctxt_params.items()}, world)  # (Nc, W, 2)
    depth = ray_disc_hits(origins, dirs, cand[:, :2], cand[:, 2]).flatten(0, 1)  # (Nc*W, Q)
    hit = torch.isfinite(depth)
    K, M = len(world.palette), world.max_discs
    ok = [~hit[labels == -1].any(0) & hit[labels == c].all(0) for c in range(K)]  # unary, (Q,) each
    idx = [torch.nonzero(o)[:, 0] for o in ok]  # the candidates left for each colour

    def pairwise(c, d):  # (n_c, n_d): may disc i of colour c and disc j of colour d coexist?
        A = apart(cand[idx[c]], cand[idx[d]])
        for own, other, flip in ((c, d, False), (d, c, True)):  # pixels of `own` need `other` behind
            mine, theirs = depth[labels == own][:, idx[own]], depth[labels == own][:, idx[other]]  # (P, n)
            behind = (theirs[:, None, :] > mine[:, :, None]).all(0)  # (n_own, n_other)
            A &= behind.T if flip else behind
        return A.double()

    A = {(c, d): pairwise(c, d) for c, d in itertools.combinations(range(K), 2)}
    visible = set(labels[labels >= 0].tolist())
    Z = prior_counts(world)
    sets, weights = [], []
    for N in range(1, M + 1):
        for S in itertools.combinations(range(K), N):
            if not visible <= set(S):
                continue
            if N == 1:
                count = float(len(idx[S[0]]))
            elif N == 2:
                count = A[S].sum().item()
            else:
                count = ((A[S[0], S[1]] @ A[S[1], S[2]]) * A[S[0], S[2]]).sum().item()
            sets.append(S)  # p(S | views) = p(N) / C(K, N) * count / Z_N, up to a constant
            weights.append(count / (M * math.comb(K, N) * Z[N - 1]))
    weights = torch.tensor(weights, dtype=torch.float64)
    if weights.sum() == 0:
        raise ValueError("no scene of the prior renders to this context")
    which = torch.multinomial(weights, n_samples, replacement=True, generator=generator)  # (n,)
    palette = torch.tensor(world.palette)
    discs = torch.zeros(n_samples, M, 6)
    for s in which.unique().tolist():
        rows, S = torch.nonzero(which == s)[:, 0], sets[s]
        n = len(rows)
        if len(S) == 1:
            picks = [idx[S[0]][torch.randint(0, len(idx[S[0]]), (n,), generator=generator)]]
        elif len(S) == 2:
            flat = torch.multinomial(A[S].flatten(), n, replacement=True, generator=generator)
            picks = [idx[S[0]][flat // A[S].shape[1]], idx[S[1]][flat % A[S].shape[1]]]
        else:  # p(i, j) ~ A_01[i, j] * sum_k A_12[j, k] A_02[i, k], then p(k | i, j) ~ A_12[j, k] A_02[i, k]
            A01, A12, A02 = A[S[0], S[1]], A[S[1], S[2]], A[S[0], S[2]]
            pair = A01 * (A02 @ A12.T)
            flat = torch.multinomial(pair.flatten(), n, replacement=True, generator=generator)
            i, j = flat // pair.shape[1], flat % pair.shape[1]
            k = torch.multinomial(A12[j] * A02[i], 1, generator=generator)[:, 0]
            picks = [idx[S[0]][i], idx[S[1]][j], idx[S[2]][k]]
        for m, (c, p) in enumerate(zip(S, picks)):
            discs[rows, m, :3] = cand[p]
            discs[rows, m, 3:] = palette[c]
    return discs


def rasterize(discs, res=GRID):
    """Scenes as signals: discs (B, M, 6) -> (B, 4, res, res) in [-1, 1], row = y, column = x.

    Occupancy is about the covered fraction of each cell: the signed distance to the nearest
    disc at the cell centre, as a linear ramp one cell wide (cheap anti-aliasing). Colour is
    that of the nearest disc everywhere (it only matters where there is density).
    """
    coords = -1 + (torch.arange(res, device=discs.device) + 0.5) * 2 / res
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([x.flatten(), y.flatten()], dim=-1)  # (res*res, 2)
    sdf = (points[:, None, :] - discs[:, None, :, :2]).norm(dim=-1) - discs[:, None, :, 2]  # (B, res*res, M)
    sdf = torch.where(discs[:, None, :, 2] > 0, sdf, torch.full_like(sdf, math.inf))
    d_min, nearest = sdf.min(dim=-1)  # (B, res*res)
    occupancy = (0.5 - d_min * res / 2).clamp(0, 1)  # 1 inside, 0 outside, a ramp across the edge cell
    color = discs[..., 3:].gather(1, nearest[..., None].expand(*nearest.shape, 3))  # (B, res*res, 3)
    field = torch.cat([occupancy[..., None], color], dim=-1).transpose(1, 2).reshape(-1, 4, res, res)
    return 2 * field - 1


def exact_posterior(ctxt_obs, ctxt_params, n_samples, generator):
    """Exact samples of p(signal | context), rasterised: ctxt_obs (B, Nc, 3, W) -> (B, n, 4, GRID, GRID)."""
    out = [rasterize(posterior_discs(obs, {k: v[b] for k, v in ctxt_params.items()}, n_samples, generator))
           for b, obs in enumerate(ctxt_obs)]
    return torch.stack(out).to(ctxt_obs.device)


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


def sample_batch(batch_size, generator, device="cpu"):
    """Scenes from the prior, seen from the context camera and from two random cameras (target, novel)."""
    discs = sample_discs(batch_size, generator)  # (B, M, 6)
    angles = torch.rand(batch_size, 2, generator=generator) * 2 * math.pi  # target, novel
    ctxt_params = cameras(torch.full((batch_size, 1), CONTEXT_ANGLE))  # (B, 1, ...)
    trgt_params, novel_params = cameras(angles[:, 0]), cameras(angles[:, 1])
    batch = dict(ctxt_obs=render_discs(discs, {k: v[:, 0] for k, v in ctxt_params.items()}).unsqueeze(1),
                 ctxt_params=ctxt_params, trgt_obs=render_discs(discs, trgt_params), trgt_params=trgt_params,
                 novel_obs=render_discs(discs, novel_params), novel_params=novel_params,
                 signal=rasterize(discs))
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()}


def held_out_batch(n_contexts, seed=0, device="cpu"):
    """Fixed evaluation contexts, from a seed stream that training never uses."""
    return sample_batch(n_contexts, toy_problems.held_out_generator(seed), device)


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
    points = torch.stack([x, y], dim=-1).view(1, 1, GRID * GRID, 2)  # (1, 1, G*G, 2)
    c2w, K = params["c2w"], params["K"]  # (B, V, 3, 3), (B, V, 2, 2)
    cam = (points - c2w[..., None, :2, 2]) @ c2w[..., :2, :2]  # (B, V, G*G, 2): R^T (p - o) = (x, z)
    u = K[..., None, 0, 0] * cam[..., 0] / cam[..., 1] + K[..., None, 0, 1]  # (B, V, G*G) in [0, 1] if seen
    seen = ((cam[..., 1] > 0) & (u >= 0) & (u <= 1)).float()
    grid = torch.stack([2 * u - 1, torch.zeros_like(u)], dim=-1).view(B * V, 1, GRID * GRID, 2)
    color = F.grid_sample(obs.reshape(B * V, 3, 1, -1), grid, align_corners=False).view(B, V, 3, -1)  # (B, V, 3, G*G)
    geometry = torch.stack([seen, 2 * u.clamp(0, 1) - 1, cam[..., 1] - WORLD.cam_dist], dim=2)  # (B, V, 3, G*G)
    return torch.cat([color * seen[:, :, None], geometry], dim=2).view(B, V, 6, GRID, GRID)


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
    """PSNR of observations in [-1, 1] (peak-to-peak 2), from the mean squared error over everything."""
    return 10 * math.log10(4 / ((a - b) ** 2).mean().item())


def draw_samples(model, batch, n_samples, generator, steps):
    """n_samples fields per context of the batch: (B, n, 4, G, G)."""
    model.eval()
    return dfm.sample_signals(model, batch, n_samples, generator, steps)  # (B, n, 4, G, G)


def evaluate(model, seed=0, n_contexts=16, n_samples=32, steps=50):
    """Scores against the exact posterior (lower is better), each with its floor, and a pixel score.

    views:    energy distance between the renders of model and exact samples from a ring of
              N_PROBES cameras (all rendered by the same `forward`, the exact ones rasterised).
    position: energy distance between the centres of the context-visible discs, read off the fields.
    *_floor:  the same distance between two independent sets of exact samples.
    psnr:     of sample renders against the true scene's (higher is better; the conditional
              mean, i.e. the deterministic model, is expected to win it). psnr_exact: exact samples.
    """
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    samples = draw_samples(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps)
    cpu = torch.Generator().manual_seed(seed)
    exact_a = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, cpu)
    exact_b = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, cpu)
    views = {name: probe_views(s) for name, s in (("model", samples), ("a", exact_a), ("b", exact_b))}
    truth = probe_views(batch["signal"][:, None])  # (B, 1, P, 3, W)
    labels = pixel_labels(batch["ctxt_obs"][:, 0].cpu())  # (B, W)

    def position(x, y):
        return torch.stack([dfm.energy_distance(disc_centers(x[b], labels[b])[None], disc_centers(y[b], labels[b])[None])
                            for b in range(n_contexts)]).mean().item()

    return {"views": dfm.energy_distance(views["model"], views["a"]).mean().item(),
            "views_floor": dfm.energy_distance(views["b"], views["a"]).mean().item(),
            "position": position(samples, exact_a), "position_floor": position(exact_b, exact_a),
            "psnr": psnr(views["model"], truth), "psnr_exact": psnr(views["a"], truth)}


def top_down(signal):
    """A field seen from above: (4, G, G) -> (G, G, 3), each cell's colour times its opacity, black background."""
    occupancy, color = ((signal + 1) / 2).clamp(0, 1).split([1, 3])
    alpha = 1 - torch.exp(-SIGMA_MAX * occupancy * 2 / GRID)  # opacity across one cell of the signal grid
    return (alpha * color).permute(1, 2, 0).cpu().numpy()


def strip(views):
    """1D views as an image, one row per camera: (P, 3, W) -> (P, W, 3)."""
    return ((views.clamp(-1, 1) + 1) / 2).permute(0, 2, 1).cpu().numpy()


def plot(model, path, seed=0, n_contexts=3, n_samples=4, steps=50):
    """For each context: the true scene, exact posterior samples and model samples, seen from above,
    each with its views from the ring of probe cameras as strips underneath (first row: the context camera)."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    samples = draw_samples(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def animate(model, path, seed=0, n_frames=36, steps=50):
    """A GIF of a camera going around one sampled scene: the scene from above and the camera's 1D view."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    device = next(model.parameters()).device
    batch = held_out_batch(1, seed, device)
    signal = draw_samples(model, batch, 1, torch.Generator(device=device).manual_seed(seed), steps)[0]  # (1, 4, G, G)
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

    FuncAnimation(fig, frame, frames=n_frames, blit=True).save(path, writer=PillowWriter(fps=8))
    plt.close(fig)
