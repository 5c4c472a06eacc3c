"""Flatland's analytic world: discs in a square, 1D cameras on a circle, and the exact posterior.

A scene is 1 to 3 discs with distinct colours from a small palette, radii from a small set
and centres on a fine lattice, none overlapping, inside the square [-1, 1]^2. Cameras sit on
a circle of radius 2.5 and look at the centre; each sees a 1D RGB image of W = 32 pixels,
rendered exactly (one ray per pixel centre, analytic ray-disc intersection, the nearest disc
wins, black background). As in the paper, poses are relative to the context camera, which
always sits at the bottom of the circle; targets are anywhere on it.

The prior, exactly what `sample_discs` draws: the number of discs N is uniform on
1..max_discs; their colours are a uniformly random set of N distinct palette colours; their
(x, y, r) are uniform over the Z_N non-overlapping N-tuples of candidates (`prior_counts`).
So a scene S with N discs has p(S) = p(N) / C(K, N) / Z_N for a palette of K colours.

One view fixes each visible disc's direction and colour but not its depth: a nearer small
disc and a farther large one look alike, and a partly occluded disc may extend behind its
occluder; discs hidden behind others (or between pixel rays) are uncertain in everything.
The exact posterior is cheap because every constraint that a view puts on a scene involves
at most two discs: it is a tiny constraint problem that we count (`posterior_sets`) and
sample (`sample_given_set`) exactly with a few matrix products.

This file knows nothing about learning. toy_problems/flatland.py builds the learned problem
(the field, the denoiser, scores and pictures) on top of it.
"""
import functools
import itertools
import math
from dataclasses import dataclass

import torch

import render


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
GRID = 32  # scenes as signals: a GRID x GRID field over [-1, 1]^2 (rasterize)


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
    """Do discs a (..., Qa, 3) and b (..., Qb, 3) not overlap? -> (..., Qa, Qb) bool.

    Centre distance > r_a + r_b; touching counts as overlap. The one rule for the prior's
    sampler, its counts and the posterior.
    """
    d = torch.cdist(a[..., :2].double(), b[..., :2].double())  # (..., Qa, Qb)
    return d > (a[..., :, None, 2] + b[..., None, :, 2]).double() + 1e-6


def sample_discs(batch_size, generator, world=WORLD):
    """Scenes from the prior: (B, M, 6) discs (x, y, r, R, G, B), r = 0 for absent discs.

    N ~ Uniform{1..M} and a uniformly random set of N palette colours, drawn once per scene;
    then the N discs' (x, y, r), each uniform on the candidates, redrawn together until no two
    overlap. Rejection keeps the uniform distribution on what it accepts, so the discs are
    uniform over the Z_N non-overlapping N-tuples. (Redrawing N too would favour few discs,
    which are accepted more often: the prior would no longer be the one posterior_discs uses.)
    """
    cand, palette, M = candidates(world), torch.tensor(world.palette), world.max_discs
    count = torch.randint(1, M + 1, (batch_size,), generator=generator)  # (B,)
    colors = torch.rand(batch_size, len(palette), generator=generator).argsort(dim=1)[:, :M]  # (B, M) distinct
    present = torch.arange(M) < count[:, None]  # (B, M)
    discs = torch.cat([torch.zeros(batch_size, M, 3), palette[colors] * present[..., None]], dim=-1)
    others = ~torch.eye(M, dtype=torch.bool)
    todo = torch.arange(batch_size)  # the scenes whose discs still overlap
    while len(todo) > 0:
        pick = cand[torch.randint(0, len(cand), (len(todo), M), generator=generator)]  # (n, M, 3)
        pick[..., 2] *= present[todo]
        both = present[todo, :, None] & present[todo, None, :] & others  # (n, M, M) pairs of present discs
        ok = ~(both & ~apart(pick, pick)).any(dim=(1, 2))  # (n,)
        discs[todo[ok], :, :3] = pick[ok]
        todo = todo[~ok]
    return discs


@functools.lru_cache(maxsize=4)
def prior_counts(world=WORLD):
    """Z_N: the number of non-overlapping N-tuples of candidates, N = 1..max_discs (float64)."""
    O = apart(candidates(world), candidates(world)).double()  # (Q, Q)
    return [float(len(O)), O.sum().item(), ((O @ O) * O).sum().item()][:world.max_discs]


# -----------------------------------------------------------------------------
# The exact posterior: count the scenes that explain the views, then sample them


def pixel_labels(obs, world=WORLD):
    """Palette index of every pixel, -1 for background: obs (..., 3, W) -> (..., W) long."""
    color = ((obs + 1) / 2).transpose(-1, -2)  # (..., W, 3)
    dist = (color[..., None, :] - torch.tensor(world.palette, device=obs.device)).norm(dim=-1)  # (..., W, K)
    d_min, label = dist.min(dim=-1)
    background = color.norm(dim=-1) < 0.05
    if not torch.all(background | (d_min < 0.05)):
        raise ValueError("a context pixel is neither background nor a palette colour: not a flatland view")
    return torch.where(background, torch.full_like(label, -1), label)


def posterior_sets(ctxt_obs, ctxt_params, world=WORLD):
    """Counting: the posterior over colour sets S, and the constraints that sampling given S needs.

    ctxt_obs (Nc, 3, W), ctxt_params dict of (Nc, ...) ->
      probs  {S: p(S | views)} for every colour set S (a tuple of palette indices) that
             contains the visible colours;
      counts {S: the number of scenes with colour set S that render to the views};
      idx    idx[c] (n_c,): the candidates that the disc of colour c may take (unary test);
      A      A[c, d] (n_c, n_d) 0/1: may candidate idx[c][i] and idx[d][j] coexist (pairwise test).

    Colours are distinct, so every coloured pixel belongs to the one disc of that colour.
    A scene with colour set S renders to the views exactly when
      (unary)    the disc of colour c covers every pixel labelled c and no background pixel;
      (pairwise) no two discs overlap, and where a pixel is labelled c, every other disc that
                 the pixel's ray hits lies behind the disc of colour c.
    Nothing involves three discs, so the number of scenes that explain the views is n_c for
    S = {c}, sum A_cd for {c, d}, and sum((A_cd @ A_de) * A_ce) for {c, d, e}. Every such
    scene has prior p(N) / C(K, N) / Z_N (see the module docstring), so p(S | views) is
    proportional to p(N) / C(K, N) * count / Z_N.
    """
    if world.max_discs > 3:
        raise ValueError("posterior_sets counts scenes of up to 3 discs")
    labels = pixel_labels(ctxt_obs.cpu(), world).flatten()  # (Nc*W,)
    cand = candidates(world)  # (Q, 3)
    origins, dirs = camera_rays({k: v.cpu() for k, v in ctxt_params.items()}, world)  # (Nc, W, 2)
    depth = ray_disc_hits(origins, dirs, cand[:, :2], cand[:, 2]).flatten(0, 1)  # (Nc*W, Q)
    hit = torch.isfinite(depth)
    K, M = len(world.palette), world.max_discs
    ok = [~hit[labels == -1].any(0) & hit[labels == c].all(0) for c in range(K)]  # unary, (Q,) each
    idx = [torch.nonzero(o)[:, 0] for o in ok]

    def pairwise(c, d):  # (n_c, n_d)
        A = apart(cand[idx[c]], cand[idx[d]])
        for own, other, flip in ((c, d, False), (d, c, True)):  # pixels of `own` need `other` behind
            mine, theirs = depth[labels == own][:, idx[own]], depth[labels == own][:, idx[other]]  # (P, n)
            behind = (theirs[:, None, :] > mine[:, :, None]).all(0)  # (n_own, n_other)
            A &= behind.T if flip else behind
        return A.double()

    A = {(c, d): pairwise(c, d) for c, d in itertools.combinations(range(K), 2)}
    visible = set(labels[labels >= 0].tolist())
    Z = prior_counts(world)
    counts, weights = {}, {}
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
            counts[S], weights[S] = count, count / (M * math.comb(K, N) * Z[N - 1])
    total = sum(weights.values())
    if total == 0:
        raise ValueError("no scene of the prior renders to this context")
    return {S: w / total for S, w in weights.items()}, counts, idx, A


def sample_given_set(S, n, idx, A, generator, world=WORLD):
    """Sampling: n scenes with colour set S from p(discs | S, views), exactly -> (n, M, 6).

    idx and A come from posterior_sets. The scenes with colour set S that explain the views
    are equally likely, so we draw one uniformly: pairs from A_cd directly, triples by drawing
    (i, j) from its marginal and then k from its conditional.
    """
    cand, palette = candidates(world), torch.tensor(world.palette)
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
    discs = torch.zeros(n, world.max_discs, 6)
    for m, (c, p) in enumerate(zip(S, picks)):  # the disc of colour S[m] in slot m
        discs[:, m, :3] = cand[p]
        discs[:, m, 3:] = palette[c]
    return discs


def posterior_discs(ctxt_obs, ctxt_params, n_samples, generator, world=WORLD):
    """Exact samples of p(scene | context views) for one example: a colour set from posterior_sets,
    then the discs given it. ctxt_obs (Nc, 3, W), ctxt_params dict of (Nc, ...) -> discs (n, M, 6)."""
    probs, _, idx, A = posterior_sets(ctxt_obs, ctxt_params, world)
    sets = list(probs)
    which = torch.multinomial(torch.tensor([probs[S] for S in sets], dtype=torch.float64), n_samples,
                              replacement=True, generator=generator)  # (n,)
    discs = torch.zeros(n_samples, world.max_discs, 6)
    for s in which.unique().tolist():
        rows = torch.nonzero(which == s)[:, 0]
        discs[rows] = sample_given_set(sets[s], len(rows), idx, A, generator, world)
    return discs


# -----------------------------------------------------------------------------
# Scenes as signals


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
