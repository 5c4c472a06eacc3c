"""3D inverse graphics from one image: the paper's model, small, on the two-tone sphere world.

The world (scenes3d_world.py) is a sphere on a ground square whose back half, never seen by
the context camera, has a colour drawn uniformly from a palette: one image fixes everything
but that colour, so a correct model samples each palette colour for the back equally often.

The problem in four parts, in the order a sample is made:
- Setting: the world, the networks' sizes and how rays are rendered, one per problem name.
- The data: scenes from the prior seen by a context camera and two ring cameras (target, novel), with
  one patch of each ring view for the loss (the hidden half's share of supervision comes by geometry:
  far-side target cameras, sphere-centred patches).
- The signal (Signal): a pixel-aligned radiance field, a field network applied to its views'
  features; the networks, and the denoiser that makes a signal from the context views and a noisy
  target, are in scenes3d_networks.py (the authors' design, small: RESULTS.md, "3D scenes from one
  image").
- The forward model: forward(signal, camera) volume-renders that field with render.py; rays start
  and stop at the setting's bounds, stratified samples plus importance samples, the coarse pass
  without gradients. During training only one random patch per target and novel view is rendered
  (`pixels`), which is what keeps the memory small; the patch's depth comes back with it.
The comparison model is dfm.Deterministic with the same networks (pixelNeRF-style). There is
no oracle: the signal is a field computed by the networks, not something the data hold.

Problem names: "scenes3d" (32x32, one sphere, sized for a laptop CPU), "scenes3d-64" and
"scenes3d-128" (larger networks, two spheres, for GPUs). The modules depend one way: the world
(scenes3d_world.py), then this problem, then its networks (scenes3d_networks.py), then the
protocol with its scores and pictures (scenes3d_eval.py, whose problem(name) is what
toy_problems.load returns, and whose make_problem builds the protocol for the toy's scenes and for
posed images on disk alike).
"""
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import dfm
import render
import toy_problems
from toy_problems import metrics, scenes3d_world as world_lib


@dataclass(frozen=True)
class Setting:
    """The world, the networks' sizes and how rays are rendered, for one problem name (posed images on disk
    have settings of their own: posed_images/problem.setting_for)."""
    world: world_lib.World = world_lib.WORLD
    ch: int = 32  # encoder width
    feat: int = 32  # F, per-pixel feature channels of the encoders
    width: int = 64  # field MLP width
    out_feat: int = 8  # Cf, feature channels the field renders (for the conditioning)
    full_res: bool = False  # encoders' features at the image's resolution (posed images: thin parts), not half
    n_samples: int = 12  # S, stratified samples per ray
    n_importance: int = 12  # importance samples per ray
    patch: int = 12  # side of the random patch rendered per target and novel view in training
    cond_size: int = 16  # the conditioning render's side (rendered without gradients, then upsampled)
    depth_smooth: float = 0.002  # weight of the edge-aware depth smoothness
    lpips: float = 0.0  # weight of LPIPS on the patches when its real weights load (0.2 on CO3D in the paper)
    box: tuple = world_lib.SCENE_BOX  # rays start and stop where they cross this box (lo, hi): the toy's scene
    near_far: tuple = None  # or (near, far) along every ray, for posed images on disk (posed_images/dataset.py)
    depth_range: tuple = (1.3, 4.3)  # (lo, hi) depths along a ray mapped to [0, 1]: the toy's box, cam_dist -+ 1.5


SETTINGS = {
    "scenes3d": Setting(),
    "scenes3d-64": Setting(world=replace(world_lib.WORLD2, size=64), ch=64, feat=64, width=128, out_feat=16,
                           n_samples=32, n_importance=32, patch=24, cond_size=32, lpips=0.2),
    "scenes3d-128": Setting(world=replace(world_lib.WORLD2, size=128), ch=64, feat=64, width=128, out_feat=16,
                            n_samples=32, n_importance=32, patch=24, cond_size=32, lpips=0.2),
}
TRAIN_DEFAULTS = {
    "scenes3d": dict(steps=4500, batch_size=8, lr=5e-4, warmup=200, ctxt_drop_prob=0.1, eval_every=0, ckpt_every=250),
    "scenes3d-64": dict(steps=100_000, batch_size=32, lr=2e-4, warmup=1000, ctxt_drop_prob=0.1, eval_every=0),
    "scenes3d-128": dict(steps=100_000, batch_size=16, lr=1e-4, warmup=1000, ctxt_drop_prob=0.1, eval_every=0),
}


# -----------------------------------------------------------------------------
# Data


FAR_TARGETS = 0.7  # share of target cameras on the far half of the ring, where the hidden halves are
ON_SPHERE_PATCHES = 0.5  # share of target and novel patches centred on a sphere


def sample_batch(batch_size, generator, device="cpu", setting=SETTINGS["scenes3d"]):
    """Scenes from the prior seen by the context camera and two ring cameras (target, novel), with
    one patch of the target and of the novel view for the loss.

    The hidden halves are a small part of a random view (about 5 % of a random patch), too little
    for the model to learn to commit to a colour there (RESULTS.md, 3D scenes). So, chosen from the
    geometry and never from the colours, so that the optimum of the objective stays the posterior:
    FAR_TARGETS of the target cameras lie on the far half of the ring (azimuth opposite the
    context +- 90 degrees), the rest and every novel camera anywhere on the ring; and
    ON_SPHERE_PATCHES of the patches are centred on a sphere's projected centre (jittered), the
    rest anywhere in the image.

    ctxt_obs (B, 1, 3, H, W), trgt_obs / novel_obs (B, 3, H, W), params dicts c2w (B, [1,] 4, 4), K;
    pixels, novel_pixels (B, P) indices of a patch x patch square in the flattened image.
    """
    w, B = setting.world, batch_size
    scenes = world_lib.sample_scenes(B, generator, w)
    azimuths = torch.rand(B, 2, generator=generator) * 2 * math.pi  # (B, 2) target, novel: anywhere on the ring
    far = torch.rand(B, generator=generator) < FAR_TARGETS
    far_azimuth = world_lib.CONTEXT_AZIMUTH + math.pi + (torch.rand(B, generator=generator) - 0.5) * math.pi
    azimuths[:, 0] = torch.where(far, far_azimuth, azimuths[:, 0])
    ctxt_params = world_lib.cameras(torch.full((B, 1), world_lib.CONTEXT_AZIMUTH), world=w)
    trgt_params, novel_params = world_lib.cameras(azimuths[:, 0], world=w), world_lib.cameras(azimuths[:, 1], world=w)
    ctxt_obs = world_lib.render_scenes(scenes, {k: v[:, 0] for k, v in ctxt_params.items()}, w)[:, None]
    batch = dict(ctxt_obs=ctxt_obs, ctxt_params=ctxt_params,
                 trgt_obs=world_lib.render_scenes(scenes, trgt_params, w), trgt_params=trgt_params,
                 novel_obs=world_lib.render_scenes(scenes, novel_params, w), novel_params=novel_params,
                 pixels=patches(scenes, trgt_params, w.size, setting.patch, generator),
                 novel_pixels=patches(scenes, novel_params, w.size, setting.patch, generator),
                 scenes=scenes)  # the truth, for scoring only
    return dfm.map_batch(lambda v: v.to(device), batch)


def patches(scenes, params, size, patch, generator):
    """Indices (B, patch*patch) of one square patch per image: ON_SPHERE_PATCHES of them centred on
    the projection of a random sphere's centre (jittered by up to size/10 pixels), the others anywhere."""
    B, M = scenes["center"].shape[:2]
    uv, _ = render.project(scenes["center"], params["c2w"], params["K"])  # (B, M, 2) in [0, 1]
    which = torch.randint(M, (B,), generator=generator)
    centre = uv[torch.arange(B), which].flip(-1) * size  # (B, 2) row, column in pixels
    jitter = torch.randint(-(size // 10), size // 10 + 1, (B, 2), generator=generator)
    on_sphere = (centre - patch / 2).round().long() + jitter
    anywhere = torch.randint(0, size - patch + 1, (B, 2), generator=generator)
    use = (torch.rand(B, generator=generator) < ON_SPHERE_PATCHES)[:, None]
    return square_patches(torch.where(use, on_sphere, anywhere).clamp(0, size - patch), size, patch)


def random_patches(batch_size, size, patch, generator):
    """Indices (B, patch*patch) of a random square patch in a flattened size x size image, row by row."""
    return square_patches(torch.randint(0, size - patch + 1, (batch_size, 2), generator=generator), size, patch)


def square_patches(corner, size, patch):
    """Indices (B, patch*patch) of the patch x patch squares whose top-left pixels are corner (B, 2) (row, column)."""
    rows = corner[:, :1] + torch.arange(patch).repeat_interleave(patch)  # (B, P)
    cols = corner[:, 1:] + torch.arange(patch).repeat(patch)
    return rows * size + cols


def held_out_batch(n_contexts, seed=0, device="cpu", setting=SETTINGS["scenes3d"]):
    """Fixed evaluation contexts, from the held-out stream."""
    return sample_batch(n_contexts, toy_problems.held_out_generator(seed), device, setting)


# -----------------------------------------------------------------------------
# The signal: a field over views


@dataclass
class Views:
    """The views a field is computed from: each view's pixel-aligned features, camera and timestep."""
    feats: torch.Tensor  # (B, V, F, h, w)
    c2w: torch.Tensor  # (B, V, 4, 4)
    K: torch.Tensor  # (B, V, 3, 3)
    t: torch.Tensor  # (B, V), 0 for a context view

    def map(self, fn):
        """The views with fn applied to each tensor: fn(x) of a (B, V, ...) tensor, e.g. a slice of the views."""
        return Views(fn(self.feats), fn(self.c2w), fn(self.K), fn(self.t))


@dataclass
class Signal:
    """The 3D signal: a radiance field, the field network applied to the features of its views; forward()
    renders it from any camera, with the setting's samples per ray and bounds."""
    field: nn.Module  # scenes3d_networks' ContextField or DenoisingField: (views, points (B, P, 3)) -> sigma, rgb, feat
    views: Views
    setting: Setting


# -----------------------------------------------------------------------------
# The forward model: volume rendering of the field


def render_pixels(signal, params, pixels=None, uv=None):
    """Render the field at the given pixels of a camera: params c2w (B, 4, 4), K (B, 3, 3).

    pixels (B, P) indices into the flattened image (default every pixel), or uv (B or 1, P, 2).
    Returns dict obs (B, 3, P) in [-1, 1], depth (B, P) normalised to about [0, 1] by the setting's
    depth_range, feat (B, Cf, P). Samples along the rays are jittered only while gradients are on
    (training), so a render for looking at is deterministic.
    """
    s = signal.setting
    if uv is None:
        uv = render.pixel_centers(s.world.size, s.world.size, device=params["K"].device)  # (H*W, 2)
        if pixels is not None:
            uv = uv[pixels]  # (B, P, 2)
    origins, dirs = render.get_rays(params["c2w"], params["K"], uv)  # (B, P, 3)
    origins = origins.expand(params["K"].shape[0], *origins.shape[-2:])
    dirs = dirs.expand_as(origins)
    near, far = ray_bounds(s, origins, dirs)  # (B, P) each

    def field(points):  # (B, P, S, 3) -> sigma (B, P, S), colour and features (B, P, S, 3 + Cf)
        B, P, S = points.shape[:3]
        sigma, rgb, feat = signal.field(signal.views, points.reshape(B, P * S, 3))
        return sigma.view(B, P, S), torch.cat([rgb, feat], dim=-1).view(B, P, S, -1)

    out = render.render_rays(field, origins, dirs, near, far, s.n_samples, s.n_importance,
                             perturb=torch.is_grad_enabled())
    color = out["rgb"].transpose(1, 2)  # (B, 3 + Cf, P)
    lo, hi = s.depth_range
    return {"obs": 2 * color[:, :3] - 1, "feat": color[:, 3:], "depth": (out["depth"] - lo) / (hi - lo)}


def ray_bounds(setting, origins, dirs):
    """Where rays (B, P, 3) start and stop, (B, P) each: where they cross the setting's box, or its near_far."""
    if setting.near_far is not None:
        near, far = setting.near_far
        return torch.full_like(origins[..., 0], near), torch.full_like(origins[..., 0], far)
    lo, hi = (torch.tensor(corner, device=origins.device) for corner in setting.box)
    return render.intersect_box(origins, dirs, lo, hi)


def forward(signal, params, pixels=None):
    """The forward model: the field rendered from a camera, obs (B, 3, H, W). With pixels (B, P), dfm.DFM's
    training patches: (obs (B, 3, P), depth (B, P)), the depth for the denoiser's aux_loss."""
    out = render_pixels(signal, params, pixels)
    if pixels is not None:
        return out["obs"], out["depth"]
    size = signal.setting.world.size
    return out["obs"].unflatten(-1, (size, size))


def render_image(signal, params, size):
    """The field rendered at size x size: (B, 3 + 1 + Cf, size, size), RGB in [-1, 1], depth, features."""
    uv = render.pixel_centers(size, size, device=params["K"].device)[None]  # (1, size*size, 2)
    out = render_pixels(signal, params, uv=uv)
    image = torch.cat([out["obs"], out["depth"][:, None], out["feat"]], dim=1)  # (B, 4 + Cf, size*size)
    return image.unflatten(-1, (size, size))


# -----------------------------------------------------------------------------
# The observation loss


def obs_loss(pred, target, setting=SETTINGS["scenes3d"]):
    """L2 on the rendered patches (B, 3, P), plus LPIPS (weight setting.lpips) when its real weights load.

    LPIPS is off in the CPU setting: on a 2-core CPU it costs 0.5-2 s per step on 16 12x12 patches
    (upsampled to 64x64 for AlexNet), more than everything else in the step together.
    """
    loss = F.mse_loss(pred, target)
    if setting.lpips == 0:
        return loss
    lpips_model = lpips_or_none()
    if lpips_model is None:
        return loss
    if pred.dim() == 3:  # a square patch, flattened
        side = math.isqrt(pred.shape[-1])
        pred, target = pred.unflatten(-1, (side, side)), target.unflatten(-1, (side, side))
    return loss + setting.lpips * metrics.lpips_distance(lpips_model.to(pred.device), pred, target).mean()


@functools.lru_cache(maxsize=None)
def lpips_or_none():
    """The real LPIPS network, or None; says once which, and why."""
    lpips_model, message = metrics.load_lpips()
    print(f"scenes3d: LPIPS loss {'on' if lpips_model is not None else 'off'}: {message}")
    return lpips_model
