"""Differentiable volume rendering for pinhole cameras, in 2D (flatland) and 3D alike.

A camera is a camera-to-world pose `c2w` (D+1, D+1) and intrinsics `K` (D, D) normalised by
the image size, with OpenCV axes: x right, y down, z forward. In 3D an image point is (u, v)
in [0, 1]^2; in 2D the image is a line, an image point is u in [0, 1] and the camera axes are
(x, z). Nothing else depends on the dimension D: a ray is an origin and a unit direction in
R^D, and a field is any function from points (..., D) to density and colour.

Rendering a ray (Max 1995; NeRF, Mildenhall et al. 2020, eq. 3), with samples t_i and
segment lengths delta_i = t_{i+1} - t_i (the last segment ends at `far`):

    alpha_i = 1 - exp(-sigma_i * delta_i)              opacity of segment i
    T_i     = exp(-sum_{j<i} sigma_j * delta_j)        transmittance: light reaching segment i
    w_i     = T_i * alpha_i                            the chance the ray stops in segment i
    C       = sum_i w_i c_i + (1 - sum_i w_i) * background

Distances t are measured along unit directions, so density is per unit length. This file
knows nothing about diffusion: get_rays and its inverse project, lookup (pixel-aligned
features: project points into views and sample their feature maps), intersect_box,
sample_along_rays, sample_pdf, composite, render_rays.
"""
import torch
import torch.nn.functional as F


def pixel_centers(*sizes, device="cpu"):
    """Normalised image coordinates of every pixel centre: sizes (W,) -> (W, 1); (H, W) -> (H*W, 2) as (u, v)."""
    axes = [(torch.arange(n, device=device) + 0.5) / n for n in reversed(sizes)]  # u first, then v
    grids = torch.meshgrid(*axes, indexing="xy") if len(axes) > 1 else axes
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)  # (P, D-1)


def get_rays(c2w, K, uv):
    """Rays through image points: c2w (..., D+1, D+1), K (..., D, D), uv (..., P, D-1) in [0, 1].

    uv may be every pixel centre (pixel_centers(H, W)) or any subset of them (a random
    patch, a few random pixels per step). Returns origins (..., P, D) and unit directions
    (..., P, D) in world coordinates.
    """
    D = K.shape[-1]
    pix = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)  # (..., P, D) homogeneous image point
    dirs_cam = pix @ torch.linalg.inv(K).transpose(-1, -2)  # (..., P, D)  K^-1 [u, 1] = (x/z, 1)
    dirs = dirs_cam @ c2w[..., :D, :D].transpose(-1, -2)  # (..., P, D)  rotate into the world
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = c2w[..., None, :D, D].expand(dirs.shape)  # (..., P, D)  the camera centre
    return origins, dirs


def project(points, c2w, K):
    """Where world points land in a camera, the inverse of get_rays.

    points (..., P, D), c2w (..., D+1, D+1), K (..., D, D) -> uv (..., P, D-1) normalised image
    coordinates (inside the image when in [0, 1]) and depth (..., P), the distance along the
    camera's forward (z) axis; depth <= 0 means the point is behind the camera, and its uv
    is meaningless.
    """
    D = K.shape[-1]
    cam = (points - c2w[..., None, :D, D]) @ c2w[..., :D, :D]  # (..., P, D)  R^T (p - o), camera frame
    depth = cam[..., -1]
    pix = cam @ K.transpose(-1, -2)  # (..., P, D)  K (x, z) = z (u, 1)
    uv = pix[..., :-1] / depth[..., None].clamp(min=1e-6)  # divide by z (clamped: behind-camera points are masked)
    return uv, depth


def lookup(features, points, c2w, K):
    """Pixel-aligned features (pixelNeRF): sample every view's feature map where the points project.

    features (B, V, C, W) in 2D or (B, V, C, H, W) in 3D, one map per view; points (B, P, D) in
    the world; c2w (B, V, D+1, D+1), K (B, V, D, D). Bilinear, with pixel centres at (i + 0.5) / W
    as in pixel_centers. Returns
      feats (B, V, P, C)  the features under each point, zero where the view does not see it,
      uv (B, V, P, D-1)   the point's image coordinates in each view,
      depth (B, V, P)     its depth in each view's camera frame,
      seen (B, V, P)      bool: in front of the camera and inside its image.
    """
    B, V, C = features.shape[:3]
    uv, depth = project(points[:, None], c2w, K)  # (B, V, P, D-1), (B, V, P)
    seen = (depth > 1e-6) & ((uv >= 0) & (uv <= 1)).all(dim=-1)  # (B, V, P)
    grid = 2 * uv.clamp(-1, 2) - 1  # (B, V, P, D-1) grid_sample's [-1, 1] image coordinates
    if grid.shape[-1] == 1:  # a 1D image is an image one pixel high
        grid = torch.cat([grid, torch.zeros_like(grid)], dim=-1)
        features = features.unsqueeze(-2)  # (B, V, C, 1, W)
    maps = features.reshape(B * V, C, *features.shape[-2:])  # (B*V, C, H, W)
    sampled = F.grid_sample(maps, grid.reshape(B * V, 1, -1, 2).to(maps.dtype), align_corners=False)  # (B*V, C, 1, P)
    feats = sampled.view(B, V, C, -1).transpose(2, 3) * seen[..., None]  # (B, V, P, C)
    return feats, uv, depth, seen


def intersect_box(origins, dirs, lo, hi):
    """Where rays enter and leave the axis-aligned box [lo, hi]^D (slab method).

    Returns near, far (..., P), clamped to start at the camera (t >= 0); rays that miss the box
    get near = far, an empty interval, so they render as background.
    """
    inv = 1.0 / torch.where(dirs == 0, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (lo - origins) * inv, (hi - origins) * inv  # (..., P, D)
    near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0)  # last entry into a slab
    far = torch.maximum(t0, t1).amin(dim=-1)  # first exit from a slab
    return near, torch.maximum(near, far)


def sample_along_rays(near, far, n_samples, perturb=False, generator=None):
    """Stratified samples: near, far (...,) -> t (..., S), one per equal bin, at the bin's start.

    perturb=True (training) jitters each sample uniformly inside its bin, so that over many
    steps the field is queried everywhere; perturb=False (evaluation) is deterministic.
    """
    edges = torch.linspace(0, 1, n_samples + 1, device=near.device)[:-1]  # (S,)
    offset = torch.zeros(*near.shape, n_samples, device=near.device)
    if perturb:
        offset = torch.rand(offset.shape, generator=generator, device=near.device)
    u = edges + offset / n_samples  # (..., S) in [0, 1)
    return near[..., None] + (far - near)[..., None] * u


def sample_pdf(bins, weights, n_samples, perturb=False, generator=None):
    """Importance samples from the piecewise-constant density given by weights on bins.

    bins (..., S+1) bin edges, weights (..., S) -> t (..., n_samples), by inverting the CDF
    (NeRF's hierarchical sampling). No gradient flows through the sample positions.
    """
    bins, weights = bins.detach(), weights.detach() + 1e-5  # the floor keeps empty rays uniform
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), pdf.cumsum(dim=-1)], dim=-1)  # (..., S+1)
    shape = (*cdf.shape[:-1], n_samples)
    if perturb:
        u = torch.rand(shape, generator=generator, device=bins.device)
    else:
        u = ((torch.arange(n_samples, device=bins.device) + 0.5) / n_samples).expand(shape)
    idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(1, cdf.shape[-1] - 1)  # bin i+1 holds u
    cdf_lo, cdf_hi = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    bin_lo, bin_hi = bins.gather(-1, idx - 1), bins.gather(-1, idx)
    frac = (u - cdf_lo) / (cdf_hi - cdf_lo).clamp(min=1e-10)
    return bin_lo + frac.clamp(0, 1) * (bin_hi - bin_lo)


def composite(sigma, rgb, t, far, background=0.0):
    """Alpha-composite samples along rays (the equations in the module docstring).

    sigma (..., S) densities, rgb (..., S, C) colours, t (..., S) sorted sample distances,
    far (...,) where the last segment ends, background a scalar or (C,).
    Returns a dict: rgb (..., C), depth (..., ) the expected distance at which the ray stops
    (the background counts as stopping at `far`), opacity (...,) = sum_i w_i, weights (..., S).
    """
    # at least float32, even under bf16 autocast (low precision loses the transmittance); float64 stays float64
    dtype = torch.promote_types(torch.promote_types(sigma.dtype, rgb.dtype), torch.float32)
    sigma, rgb, t, far = sigma.to(dtype), rgb.to(dtype), t.to(dtype), far.to(dtype)
    deltas = torch.cat([t[..., 1:] - t[..., :-1], far[..., None] - t[..., -1:]], dim=-1).clamp(min=0)  # (..., S)
    tau = sigma * deltas  # optical thickness of each segment
    alpha = 1 - torch.exp(-tau)
    # T_i = exp(-sum_{j<i} tau_j): an exclusive cumulative sum, stable for huge densities
    trans = torch.exp(-torch.cat([torch.zeros_like(tau[..., :1]), tau[..., :-1]], dim=-1).cumsum(dim=-1))
    weights = trans * alpha  # (..., S)
    opacity = weights.sum(dim=-1)  # (...,)
    color = (weights[..., None] * rgb).sum(dim=-2) + (1 - opacity)[..., None] * background  # (..., C)
    depth = (weights * t).sum(dim=-1) + (1 - opacity) * far  # (...,)
    return {"rgb": color, "depth": depth, "opacity": opacity, "weights": weights}


def render_rays(field, origins, dirs, near, far, n_samples=64, n_importance=0, perturb=False,
                generator=None, background=0.0):
    """Render rays through a field: sample -> query -> composite (-> resample -> query -> composite).

    field(points (..., R, S, D)) -> (sigma (..., R, S), rgb (..., R, S, C)).
    origins, dirs (..., R, D); near, far (..., R).
    n_importance > 0 adds that many samples drawn from the first pass's weights (hierarchical
    sampling) and composites all samples together; the first pass is returned as "coarse". The
    second pass queries the field only at the new samples and sorts them in among the first
    pass's, whose values it already has: the same render as querying all of them again, for a
    third fewer queries. No gradient flows through where the new samples are placed.
    Returns composite()'s dict plus t (..., R, S_total), the sample distances.
    """
    t = sample_along_rays(near, far, n_samples, perturb, generator)  # (..., R, S)
    points = origins[..., None, :] + t[..., None] * dirs[..., None, :]  # (..., R, S, D)
    sigma, rgb = field(points)
    out = composite(sigma, rgb, t, far, background)
    if n_importance > 0:
        bins = near[..., None] + (far - near)[..., None] * torch.linspace(0, 1, n_samples + 1, device=near.device)
        t_fine = sample_pdf(bins, out["weights"], n_importance, perturb, generator)  # (..., R, Si)
        sigma_fine, rgb_fine = field(origins[..., None, :] + t_fine[..., None] * dirs[..., None, :])
        t, order = torch.sort(torch.cat([t, t_fine], dim=-1), dim=-1)  # (..., R, S + Si)
        sigma = torch.cat([sigma, sigma_fine], dim=-1).gather(-1, order)
        rgb = torch.cat([rgb, rgb_fine], dim=-2).gather(-2, order[..., None].expand(*order.shape, rgb.shape[-1]))
        coarse, out = out, composite(sigma, rgb, t, far, background)
        out["coarse"] = coarse
    out["t"] = t
    return out
