"""The analytic world of the 3D toy problem: two-tone spheres whose hidden half is random by construction.

A scene is `n_spheres` spheres resting on a grey ground square [-1, 1]^2 (z = 0, z up) under a
fixed directional light, against a black sky; images are exact ray casts (one ray per pixel
centre, analytic ray-sphere and ray-plane hits, Lambertian shading, no shadows). Each sphere is
split by the plane through its centre whose normal points at the context camera: the front half
has one palette colour and the back half its own, drawn independently. A camera at distance d
from a sphere of radius r sees a cap of half-angle arccos(r / d) < 90 degrees around its own
direction, so the context camera never sees any of the back half (the tests check it pixel by
pixel; a split with a horizontal normal would leak back-half pixels into this elevated view).

The prior (exactly what `sample_scenes` draws, with no rejection): independently for each
sphere m, its centre (x, y) is uniform on the lattice points of its slot, its radius r uniform
on `radii`, centre z = r (resting on the ground), front and back colours each uniform on the
palette. With one sphere its slot is the whole lattice (a `lattice` x `lattice` grid over
[-(1 - r_max), 1 - r_max]^2, so every sphere lies over the ground square). With two, sphere 0
takes the lattice columns with x + r_max <= -gap and sphere 1 those with x - r_max >= gap: the
plane x = 0 separates them and contains the context camera, so they never overlap, never
occlude each other in the context view, and each shows up in its own half of that image.

The exact posterior given the context view: that image depends only on the geometry and the
front colours, and (with two spheres) its left half only on sphere 0 and its right half only
on sphere 1. So each sphere's (position, radius, front colour) is uniform over the candidates
of its slot whose render reproduces its half of the image (exactly one in practice: the tests
check that all candidates look different), and the back colours keep their prior, independent
and uniform over the palette. `back_colour_scores` measures how well a model's samples get
that uniform distribution, from cameras on the far side.

Cameras follow render.py: c2w (..., 4, 4) with OpenCV axes (x right, y down, z forward) and
intrinsics K (..., 3, 3) normalised by the image size. They sit on an upper ring around a
point above the origin; the context camera always sits at azimuth CONTEXT_AZIMUTH (poses are
relative to it, as in the paper). Observations are 2 * colour - 1 in [-1, 1]; the sky is -1.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import render


@dataclass(frozen=True)
class World:
    """The prior over scenes, the lighting and the cameras; WORLD is the CPU default, WORLD2 the two-sphere one."""
    size: int = 32  # H = W, image side in pixels
    n_spheres: int = 1  # M: 1 or 2
    radii: tuple = (0.4, 0.5)  # big enough that a back half covers a few pixels at 32x32
    palette: tuple = ((0.9, 0.15, 0.15), (0.15, 0.75, 0.2), (0.2, 0.35, 0.95), (0.95, 0.85, 0.15))
    lattice: int = 5  # centre (x, y) on a lattice x lattice grid over [-(1 - r_max), 1 - r_max]^2
    gap: float = 0.05  # with two spheres, each stays this far from the plane x = 0
    ground: tuple = (0.5, 0.5, 0.5)  # albedo of the ground square [-1, 1]^2 at z = 0
    light: tuple = (0.3, -0.4, 1.0)  # direction towards the light (normalised when used): from above
    ambient: float = 0.35  # shading = ambient + (1 - ambient) * max(0, n . l)
    cam_dist: float = 2.8  # cameras on a sphere of this radius around `target`
    elevation_deg: float = 30.0  # default camera elevation (the context camera's)
    half_fov_deg: float = 33.0  # the whole ground square is in view from cam_dist >= 2.8, elevation 25-35
    target: tuple = (0.0, 0.0, 0.25)  # every camera looks at this point


WORLD = World()
WORLD2 = World(size=64, n_spheres=2, radii=(0.25, 0.35), lattice=7)  # two spheres (GPU): 2 x 7 points a side
SCENE_BOX = ((-1.05, -1.05, -0.05), (1.05, 1.05, 1.1))  # (lo, hi) corners (x, y, z): all that is visible
CONTEXT_AZIMUTH = -math.pi / 2  # the context camera sits on the -y side and looks along +y (image right = +x)
SHARP_RMSE = 0.1  # a sample is "sharp" when it is this close (RMSE in [-1, 1] units) to a palette render
FAR_SIDE_DEG = (180.0, 150.0, 210.0)  # far-side cameras: azimuths relative to the context camera


# -----------------------------------------------------------------------------
# Cameras


def cameras(azimuth, elevation=None, world=WORLD):
    """Cameras looking at world.target: azimuth (...,) in radians, elevation (...,) in radians
    (default world.elevation_deg) -> dict(c2w (..., 4, 4), K (..., 3, 3)), on the device of azimuth."""
    azimuth = torch.as_tensor(azimuth, dtype=torch.float32)
    if elevation is None:
        elevation = math.radians(world.elevation_deg)
    azimuth, elevation = torch.broadcast_tensors(azimuth, torch.as_tensor(elevation, dtype=torch.float32,
                                                                           device=azimuth.device))
    away = torch.stack([elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], -1)
    fwd = -away  # (..., 3) the camera's z axis
    up = torch.tensor([0.0, 0.0, 1.0], device=fwd.device).expand_as(fwd)
    right = F.normalize(torch.linalg.cross(fwd, up), dim=-1)  # level: no roll
    down = torch.linalg.cross(fwd, right)  # y = z cross x: world up appears at smaller v
    c2w = torch.zeros(*azimuth.shape, 4, 4, device=azimuth.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2] = right, down, fwd
    c2w[..., :3, 3] = torch.tensor(world.target, device=fwd.device) + world.cam_dist * away
    c2w[..., 3, 3] = 1.0
    focal = 0.5 / math.tan(math.radians(world.half_fov_deg))  # normalised by the image side
    K = torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], device=fwd.device)
    return {"c2w": c2w, "K": K.expand(*azimuth.shape, 3, 3).clone()}


def context_camera(world=WORLD, device="cpu"):
    """The context camera: dict(c2w (4, 4), K (3, 3))."""
    return cameras(torch.tensor(CONTEXT_AZIMUTH, device=device), world=world)


def far_side_cameras(world=WORLD, device="cpu"):
    """Cameras opposite the context camera (FAR_SIDE_DEG): dict(c2w (V, 4, 4), K (V, 3, 3)), V = 3.

    From each, the back halves are in view (the tests check it); index 0 is straight opposite.
    """
    return cameras(CONTEXT_AZIMUTH + torch.tensor(FAR_SIDE_DEG, device=device) * math.pi / 180, world=world)


def orbit_cameras(n_frames, world=WORLD, device="cpu"):
    """A circle of cameras starting at the context camera (for GIFs): dict(c2w (F, 4, 4), K (F, 3, 3))."""
    return cameras(CONTEXT_AZIMUTH + torch.arange(n_frames, device=device) * 2 * math.pi / n_frames, world=world)


# -----------------------------------------------------------------------------
# The prior


def slot_positions(world=WORLD, device="cpu"):
    """The lattice points that sphere m may sit on: a list of M tensors (P_m, 2) of centre (x, y)."""
    if world.n_spheres not in (1, 2):
        raise ValueError("the world holds 1 or 2 spheres")
    side = torch.linspace(-1 + max(world.radii), 1 - max(world.radii), world.lattice, device=device)
    columns = [side] if world.n_spheres == 1 else [side[side + max(world.radii) <= -world.gap + 1e-6],
                                                   side[side - max(world.radii) >= world.gap - 1e-6]]
    slots = []
    for x in columns:
        if len(x) == 0:
            raise ValueError("no lattice column fits a sphere in each half: use smaller radii or a finer lattice")
        slots.append(torch.cartesian_prod(x, side))  # (P_m, 2)
    return slots


def make_scenes(xy, radius, front, back, world=WORLD):
    """A scenes dict from sphere centres xy (..., M, 2), radii (..., M) and palette indices (..., M).

    Adds centre z = r (resting on the ground) and the split normals: the unit vectors from each
    centre to the context camera.
    """
    center = torch.cat([xy, radius[..., None]], dim=-1)  # (..., M, 3)
    eye = context_camera(world, xy.device)["c2w"][:3, 3]  # (3,)
    return {"center": center, "radius": radius, "front": front, "back": back,
            "normal": F.normalize(eye - center, dim=-1)}


def sample_scenes(batch_size, generator, world=WORLD):
    """Scenes from the prior (module docstring), on the generator's device:
    center (B, M, 3), radius (B, M), front (B, M) long, back (B, M) long, normal (B, M, 3)."""
    device, B, K = generator.device, batch_size, len(world.palette)
    xy = []
    for pos in slot_positions(world, device):
        xy.append(pos[torch.randint(len(pos), (B,), generator=generator, device=device)])  # (B, 2) uniform on the slot
    radii = torch.tensor(world.radii, device=device)
    radius = radii[torch.randint(len(radii), (B, world.n_spheres), generator=generator, device=device)]  # (B, M)
    front = torch.randint(K, (B, world.n_spheres), generator=generator, device=device)
    back = torch.randint(K, (B, world.n_spheres), generator=generator, device=device)
    return make_scenes(torch.stack(xy, dim=1), radius, front, back, world)


def with_back_colours(scenes, back):
    """A copy of scenes with the back colours replaced by back (broadcast to (B, M), palette indices)."""
    return {**scenes, "back": torch.as_tensor(back, device=scenes["back"].device).expand_as(scenes["back"]).clone()}


# -----------------------------------------------------------------------------
# Exact rendering


def trace(scenes, origins, dirs, world=WORLD):
    """Cast rays into scenes: origins, dirs (B, R, 3) with unit dirs -> dict:

    rgb (B, R, 3) in [0, 1] (albedo x shading, black sky), depth (B, R) distance along the ray
    (inf for the sky), part (B, R) long: -1 sky, 0 ground, 1 + 2m front half of sphere m, 2 + 2m
    its back half. M is read off the scenes, so any number of spheres works here.
    """
    c, r = scenes["center"], scenes["radius"]  # (B, M, 3), (B, M)
    oc = c[:, None] - origins[:, :, None]  # (B, R, M, 3)
    b = (oc * dirs[:, :, None]).sum(-1)  # (B, R, M) distance to the point of closest approach
    h2 = r[:, None] ** 2 - ((oc * oc).sum(-1) - b * b)  # half-chord squared
    t_sphere = b - h2.clamp(min=0).sqrt()  # the near hit
    t_sphere = torch.where((h2 > 0) & (t_sphere > 0), t_sphere, torch.full_like(t_sphere, math.inf))
    dz = torch.where(dirs[..., 2] < 0, dirs[..., 2], torch.full_like(dirs[..., 2], -1.0))
    t_ground = -origins[..., 2] / dz  # (B, R) where the ray meets z = 0, if it goes down
    on_square = ((origins[..., :2] + t_ground[..., None] * dirs[..., :2]).abs() <= 1).all(-1)
    on_ground = (dirs[..., 2] < 0) & (t_ground > 0) & on_square
    t_ground = torch.where(on_ground, t_ground, torch.full_like(t_ground, math.inf))
    depth, hit = torch.cat([t_ground[..., None], t_sphere], dim=-1).min(dim=-1)  # (B, R): 0 ground, 1 + m sphere m
    sky, sphere = ~torch.isfinite(depth), hit > 0
    point = origins + torch.where(sky, torch.zeros_like(depth), depth)[..., None] * dirs  # (B, R, 3)

    m = (hit - 1).clamp(min=0)  # (B, R) the sphere hit (0 where it is not a sphere)

    def of_hit_sphere(x):  # per-sphere values (B, M, ...) -> those of the sphere each ray hit (B, R, ...)
        return x.gather(1, m.view(*m.shape, *[1] * (x.dim() - 2)).expand(*m.shape, *x.shape[2:]))

    n_sphere = F.normalize(point - of_hit_sphere(c), dim=-1)  # (B, R, 3) outward normal
    is_back = (n_sphere * of_hit_sphere(scenes["normal"])).sum(-1) < 0  # behind the split plane
    palette = torch.tensor(world.palette, device=dirs.device)
    albedo = palette[torch.where(is_back, of_hit_sphere(scenes["back"]), of_hit_sphere(scenes["front"]))]  # (B, R, 3)
    up = torch.tensor([0.0, 0.0, 1.0], device=dirs.device)
    normal = torch.where(sphere[..., None], n_sphere, up)
    albedo = torch.where(sphere[..., None], albedo, torch.tensor(world.ground, device=dirs.device))
    light = F.normalize(torch.tensor(world.light, device=dirs.device), dim=0)
    shade = world.ambient + (1 - world.ambient) * (normal @ light).clamp(min=0)  # Lambert plus ambient
    rgb = torch.where(sky[..., None], torch.zeros_like(albedo), albedo * shade[..., None])
    part = torch.where(sphere, 1 + 2 * m + is_back.long(), torch.zeros_like(m))
    return {"rgb": rgb, "depth": depth, "part": torch.where(sky, torch.full_like(part, -1), part)}


def _trace_camera(scenes, params, world, uv):
    """trace() through a camera: params c2w (B or none, 4, 4); uv (B or none, P, 2), default every pixel."""
    if uv is None:
        uv = render.pixel_centers(world.size, world.size, device=params["K"].device)  # (H*W, 2) row by row
    origins, dirs = render.get_rays(params["c2w"], params["K"], uv)  # (B or 1, P, 3)
    shape = (scenes["center"].shape[0], *dirs.shape[-2:])
    return trace(scenes, origins.expand(shape), dirs.expand(shape), world)


def render_scenes(scenes, params, world=WORLD, uv=None):
    """The forward model of the world: obs (B, 3, H, W) in [-1, 1], or (B, 3, P) at image points uv (B or none, P, 2).

    params: c2w (B, 4, 4) and K (B, 3, 3), or one camera (4, 4), (3, 3) for the whole batch.
    """
    rgb = _trace_camera(scenes, params, world, uv)["rgb"]  # (B, P, 3)
    obs = 2 * rgb.transpose(1, 2) - 1  # (B, 3, P)
    return obs if uv is not None else obs.reshape(*obs.shape[:2], world.size, world.size)


def render_parts(scenes, params, world=WORLD):
    """Part labels of every pixel (as in trace): (B, H, W) long."""
    return _trace_camera(scenes, params, world, None)["part"].reshape(-1, world.size, world.size)


# -----------------------------------------------------------------------------
# The exact posterior


def slot_candidates(m, world=WORLD, device="cpu"):
    """Every sphere that slot m can hold: one-sphere scenes with leading (Q, 1), Q = P_m x radii x palette,
    each with its back painted like its front (unseen by the context camera anyway)."""
    pos, radii = slot_positions(world, device)[m], torch.tensor(world.radii, device=device)
    p, r, k = torch.meshgrid(torch.arange(len(pos), device=device), torch.arange(len(radii), device=device),
                             torch.arange(len(world.palette), device=device), indexing="ij")
    k = k.flatten()[:, None]  # (Q, 1)
    return make_scenes(pos[p.flatten()][:, None], radii[r.flatten()][:, None], k, k, world)


def exact_posterior_scenes(ctxt_obs, n_samples, generator, world=WORLD, tol=0.02):
    """Exact samples of p(scene | context view): ctxt_obs (B, 3, H, W) -> scenes with leading (B, n).

    For each sphere slot, every candidate (lattice position x radius x front colour) is rendered
    alone at the context camera and compared with that slot's half of the image (the whole image
    with one sphere); the candidates within tol of every pixel value are the posterior's support,
    drawn uniformly (the prior is uniform over them). Back colours are drawn from the prior. Raises
    ValueError if a slot has no such candidate: the image is not a context view of this world.
    """
    B, device, gdev = ctxt_obs.shape[0], ctxt_obs.device, generator.device
    K, M, W = len(world.palette), world.n_spheres, world.size
    params = context_camera(world, device)
    xy, radius, front = [], [], []
    for m in range(M):
        cand = slot_candidates(m, world, device)  # (Q, 1, ...)
        cols = slice(m * W // M, (m + 1) * W // M)  # with two spheres, sphere m is only seen in half m
        renders = render_scenes(cand, params, world)[..., cols].flatten(1)  # (Q, 3*H*W/M)
        err = torch.cdist(ctxt_obs[..., cols].flatten(1)[None], renders[None], p=math.inf)[0]  # (B, Q) max |diff|
        match = err < tol
        if not match.any(dim=1).all():
            raise ValueError(f"no scene of the prior renders to this context view (sphere {m}: the nearest "
                             f"candidate is {err.min(dim=1).values.max().item():.3f} away in max abs difference)")
        pick = torch.multinomial(match.float().to(gdev), n_samples, replacement=True, generator=generator).to(device)
        xy.append(cand["center"][pick, 0, :2])  # (B, n, 2)
        radius.append(cand["radius"][pick, 0])  # (B, n)
        front.append(cand["front"][pick, 0])
    back = torch.randint(K, (B, n_samples, M), generator=generator, device=gdev).to(device)  # the prior's
    return make_scenes(torch.stack(xy, 2), torch.stack(radius, 2), torch.stack(front, 2), back, world)


# -----------------------------------------------------------------------------
# Scoring the hidden half


def erode(mask):
    """Keep the pixels whose 3x3 neighbourhood lies inside mask (bool (B, H, W)); the image border does not erode."""
    outside = F.max_pool2d((~mask).float()[:, None], 3, stride=1, padding=1)[:, 0]  # padding is -inf: ignored
    return mask & (outside == 0)


def back_colour_scores(sample_obs, scenes_true, far_params, world=WORLD, threshold=SHARP_RMSE):
    """How well samples get the back colours, from renders of them by one far-side camera.

    sample_obs (B, n, 3, H, W) in [-1, 1]; scenes_true with leading (B,); far_params c2w (B, 4, 4)
    or one camera (4, 4) (for several far-side cameras, call once per camera). For each sphere m,
    keep the pixels where its true back half is seen (eroded by one pixel, so that silhouette
    edges do not count) and render the true scene with every back painted in palette colour k;
    hidden_colour_scores classifies the samples against those renders. Raises ValueError if no
    back half is in view of this camera.
    """
    M = scenes_true["center"].shape[1]
    parts = render_parts(scenes_true, far_params, world)  # (B, H, W)
    keep = torch.stack([erode(parts == 2 + 2 * m) for m in range(M)], 1)  # (B, M, H, W)
    colours = torch.stack([render_scenes(with_back_colours(scenes_true, k), far_params, world)
                           for k in range(len(world.palette))], 1)  # (B, K, 3, H, W)
    scores = hidden_colour_scores(sample_obs, keep, colours, threshold)
    if not scores["valid"].any():
        raise ValueError("no back half is in view of this camera")
    return scores


def hidden_colour_scores(sample_obs, keep, colours, threshold=SHARP_RMSE):
    """Classify each sample's hidden parts as the palette colour whose exact render is nearest there.

    sample_obs (B, n, 3, H, W) in [-1, 1]; keep (B, M, H, W) bool, the pixels of hidden part m (a
    sphere's back half, or a mesh's unseen surface: posed_images/meshes.py); colours (B, K, 3, H, W), the
    true scene with every hidden part painted palette colour k. The squared error is averaged over
    channels and over the kept pixels of each part. Returns dict:
      tv: total variation between each context's histogram of sampled colours and the exact
          uniform, averaged over contexts (and parts); compare with hidden_floor().
      sharp: the fraction of samples whose RMSE to the nearest palette render is below threshold.
      histogram (B, K): per context, the fraction of samples in each colour (mean over parts);
      histogram_per_sphere (B, M, K), rmse (B, n, M) to the nearest palette render, nearest (B, n, M)
      its palette index, valid (B, M) whether part m is in view (those that are not count nowhere).
    """
    K, keep = colours.shape[1], keep.float()
    sq = ((sample_obs[:, :, None] - colours[:, None]) ** 2).mean(3)  # (B, n, K, H, W), mean over channels
    count = keep.sum(dim=(-2, -1))  # (B, M)
    err = torch.einsum("bnkhw,bmhw->bnkm", sq, keep) / count.clamp(min=1)[:, None, None]  # (B, n, K, M) MSE
    best, nearest = err.min(dim=2)  # (B, n, M)
    hist = F.one_hot(nearest, K).float().mean(1)  # (B, M, K)
    valid = count > 0  # (B, M)
    tv = 0.5 * (hist - 1 / K).abs().sum(-1)  # (B, M)
    sharp = (best.sqrt() < threshold).float().mean(1)  # (B, M)
    v = valid.float()
    return {"tv": ((tv * v).sum() / v.sum().clamp(min=1)).item(),
            "sharp": ((sharp * v).sum() / v.sum().clamp(min=1)).item(),
            "histogram": (hist * v[..., None]).sum(1) / v.sum(1, keepdim=True).clamp(min=1),
            "histogram_per_sphere": hist, "rmse": best.sqrt(), "nearest": nearest, "valid": valid}


def hidden_floor(n_samples, n_contexts, generator, palette_size, n_repeats=500):
    """The tv of back_colour_scores for exact samples: E[tv] of n_samples uniform draws per context,
    averaged over n_contexts contexts (pass n_contexts * M with M spheres), estimated from n_repeats sets."""
    draws = torch.randint(palette_size, (n_repeats, n_contexts, n_samples), generator=generator,
                          device=generator.device)
    hist = F.one_hot(draws, palette_size).float().mean(2)  # (n_repeats, n_contexts, K)
    return (0.5 * (hist - 1 / palette_size).abs().sum(-1)).mean().item()
