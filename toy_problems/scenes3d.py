"""3D inverse graphics from one image: the paper's model, small, on the two-tone sphere world.

The world (scenes3d_world.py) is a sphere on a ground square whose back half, never seen by
the context camera, has a colour drawn uniformly from a palette: one image fixes everything
but that colour, so a correct model samples each palette colour for the back equally often.

The model follows the authors' design (README "3D scenes"):
- An image encoder (a small UNet, pixel-unshuffled to half resolution) gives per-pixel
  features of each context view (at t = 0) and of the noisy target (at t). Before the target is
  encoded, a *context-only* field is rendered at the target camera (RGB, normalised depth,
  features) and concatenated to it: the 3D-structured conditioning.
- The signal is a pixel-aligned radiance field: a 3D point is projected into every view with
  render.lookup, the features found there are combined with a positional encoding of the
  point in that camera's frame, modulated by the view's timestep (FiLM), mean-pooled over the
  views that see it and decoded into density, colour and a small feature vector.
- forward(signal, camera) volume-renders that field with render.py: rays clipped to the scene
  box, stratified samples plus importance samples, the coarse pass without gradients. During
  training only one random patch per target and novel view is rendered (`pixels`), which is
  what keeps the memory small.
- Extra loss terms, added by the denoiser's aux_loss: the conditioning render's own L2 on a
  random patch of the target, and an edge-aware smoothness of the rendered depth.
The comparison model is dfm.Deterministic with the same networks (pixelNeRF-style). There is
no oracle: the signal is a field computed by the networks, not something the data hold.

Problem names: "scenes3d" (32x32, one sphere, sized for a laptop CPU), "scenes3d-64" and
"scenes3d-128" (larger networks, two spheres, for GPUs). The modules depend one way: the world
(scenes3d_world.py), then this model, then the protocol with its scores and pictures
(scenes3d_eval.py, whose problem(name) is what toy_problems.load returns).
"""
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import dfm
from toy_problems import metrics
import render
import toy_problems
from toy_problems import scenes3d_world as world_lib


@dataclass(frozen=True)
class Setting:
    """Sizes of the world and the networks for one problem name."""
    world: world_lib.World = world_lib.WORLD
    ch: int = 32  # encoder width
    feat: int = 32  # F, per-pixel feature channels of the encoders
    width: int = 64  # field MLP width
    out_feat: int = 8  # Cf, feature channels the field renders (for the conditioning)
    n_samples: int = 12  # S, stratified samples per ray
    n_importance: int = 12  # importance samples per ray
    patch: int = 12  # side of the random patch rendered per target and novel view in training
    cond_size: int = 16  # the conditioning render's side (rendered without gradients, then upsampled)
    depth_smooth: float = 0.002  # weight of the edge-aware depth smoothness
    lpips: float = 0.0  # weight of LPIPS on the patches when its real weights load (0.2 on CO3D in the paper)
    bounds: tuple = None  # (near, far) along every ray, for posed images on disk (posed_images/formats.py); None: the toy's scene box


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
N_FREQS = 4  # positional encoding frequencies


# -----------------------------------------------------------------------------
# Data


FAR_TARGETS = 0.7  # share of target cameras on the far half of the ring, where the hidden halves are
ON_SPHERE_PATCHES = 0.5  # share of target and novel patches centred on a sphere


def sample_batch(batch_size, generator, device="cpu", setting=SETTINGS["scenes3d"]):
    """Scenes from the prior seen by the context camera and two ring cameras (target, novel), with
    one patch of the target and of the novel view for the loss.

    The hidden halves are a small part of a random view (about 5 % of a random patch), too little
    for the model to learn to commit to a colour there (README, 3D scenes). So, chosen from the
    geometry and never from the colours, which leaves the objective's optimum where it was:
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
# The networks


class Encoder(nn.Module):
    """A small timestep-conditioned UNet: (B, C_in, H, W) -> features (B, F, H/2, W/2).

    2x2 pixels are folded into channels first (pixel unshuffle), which keeps it cheap on a CPU;
    then one level down and back up, with a skip connection.
    """

    def __init__(self, c_in, ch, feat):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(ch, 2 * ch), nn.SiLU(), nn.Linear(2 * ch, 2 * ch))
        self.inp = nn.Conv2d(4 * c_in, ch, 3, padding=1)
        self.enc = dfm.ResBlock2d(ch, 2 * ch)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = dfm.ResBlock2d(2 * ch, 2 * ch)
        self.up = nn.Conv2d(3 * ch, ch, 3, padding=1)
        self.dec = dfm.ResBlock2d(ch, 2 * ch)
        self.out = nn.Conv2d(ch, feat, 1)
        self.ch = ch

    def forward(self, x, t):  # x (B, C_in, H, W), t (B,)
        temb = self.time(dfm.timestep_embedding(t, self.ch))  # (B, 2ch)
        h1 = self.enc(self.inp(F.pixel_unshuffle(x, 2)), temb)  # (B, ch, H/2, W/2)
        h = self.mid(self.down(h1), temb)  # (B, 2ch, H/4, W/4)
        h = self.dec(self.up(torch.cat([F.interpolate(h, size=h1.shape[-2:]), h1], dim=1)), temb)
        return self.out(F.silu(h))  # (B, F, H/2, W/2)


class FieldBlock(nn.Module):
    """A residual MLP block, FiLM-modulated by each view's timestep embedding."""

    def __init__(self, width):
        super().__init__()
        self.norm, self.lin1, self.lin2 = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)
        self.film = nn.Linear(width, 2 * width)

    def forward(self, h, temb):  # h (..., width), temb broadcastable to (..., width)
        scale, shift = self.film(temb).chunk(2, dim=-1)
        return h + self.lin2(F.silu(self.lin1(F.silu(self.norm(h) * (1 + scale) + shift))))


class Field(nn.Module):
    """The pixel-aligned radiance field: points (B, P, 3) seen from V views -> sigma, colour, features.

    Each view's feature at a point's projection, with the point's position in that camera's
    frame, goes through a FieldBlock modulated by that view's timestep. Then:
    - with_target=False (the context-only field): the mean over the context views that see the point;
    - with_target=True (the denoising field): the last view is the noisy target. The mean over the
      contexts is concatenated with the target's own vector and its "seen" flag, merged, and
      modulated once more by the target's timestep. A back-half point projects into the context
      image onto the *front* pixel that hides it (render.lookup tests the frustum, not
      occlusion), so a plain mean over all views would average that front colour 50/50 with the
      target's evidence; kept apart, the network can let the target win where it should (the
      diagnostics of experiments/diagnose3d.py measured this: README, 3D scenes).
    """

    def __init__(self, feat, width, out_feat, cam_dist, with_target):
        super().__init__()
        self.cam_dist = cam_dist  # depths are encoded relative to the cameras' distance from the scene
        self.with_target = with_target
        self.inp = nn.Linear(feat + 3 * (1 + 2 * N_FREQS), width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU())
        self.view_block = FieldBlock(width)  # per view, before pooling
        if with_target:
            self.merge = nn.Linear(2 * width + 1, width)  # [mean of contexts, target, target sees the point]
            self.target_block = FieldBlock(width)  # after merging, modulated by the target's timestep
        self.joint = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width),
                                   nn.SiLU())
        self.head = nn.Linear(width, 1 + 3 + out_feat)
        self.width = width

    def forward(self, views, points):
        """views: dict feats (B, V, F, h, w), c2w (B, V, 4, 4), K (B, V, 3, 3), t (B, V); points (B, P, 3).
        Returns sigma (B, P) >= 0, rgb (B, P, 3) in [0, 1], feat (B, P, Cf).

        Density is softplus(x - 1) rather than the authors' ReLU: a ReLU field whose pre-activations
        start out all negative renders nothing and never receives a gradient (this happened to
        small networks here at some seeds)."""
        feats, uv, depth, seen = render.lookup(views["feats"], points, views["c2w"], views["K"])  # (B, V, P, F) ...
        cam = torch.cat([2 * uv - 1, (depth - self.cam_dist)[..., None]], dim=-1)  # (B, V, P, 3) the point in each camera's frame
        freqs = 2.0 ** torch.arange(N_FREQS, device=points.device) * math.pi / 2
        angles = (cam[..., None] * freqs).flatten(-2)  # (B, V, P, 3 * N_FREQS)
        h = self.inp(torch.cat([feats, cam, angles.sin(), angles.cos()], dim=-1))  # (B, V, P, width)
        temb = self.time(dfm.timestep_embedding(views["t"].flatten(), self.width)).view(*views["t"].shape, 1, -1)
        h = self.view_block(h, temb)  # (B, V, P, width)
        n_ctxt = h.shape[1] - 1 if self.with_target else h.shape[1]
        w = seen[:, :n_ctxt].float()[..., None]  # average over the context views that see the point
        pooled = (h[:, :n_ctxt] * w).sum(1) / w.sum(1).clamp(min=1)  # (B, P, width)
        if self.with_target:
            seen_trgt = seen[:, -1].float()[..., None]  # (B, P, 1)
            pooled = self.merge(torch.cat([pooled, h[:, -1] * seen_trgt, seen_trgt], dim=-1))  # (B, P, width)
            pooled = self.target_block(pooled, temb[:, -1])
        out = self.head(self.joint(pooled))
        return F.softplus(out[..., 0] - 1), torch.sigmoid(out[..., 1:4]), out[..., 4:]


class Denoiser(nn.Module):
    """(context views, noisy target, cameras, t) -> the signal: a field over the context and target views.

    The signal is a dict that forward() renders: the field network, every view's features,
    cameras and timesteps (the target last), and the render settings. The context-only signal
    used for the conditioning has a field of its own, as in the authors' model: its regression
    loss would otherwise pull the denoising field's hidden half towards the mean colour.
    """

    def __init__(self, setting):
        super().__init__()
        s = self.setting = setting
        self.ctxt_encoder = Encoder(3, s.ch, s.feat)
        self.trgt_encoder = Encoder(3 + 3 + 1 + s.out_feat, s.ch, s.feat)  # noisy target + conditioning render
        self.context_field = Field(s.feat, s.width, s.out_feat, s.world.cam_dist, with_target=False)
        self.field = Field(s.feat, s.width, s.out_feat, s.world.cam_dist, with_target=True)

    def signal(self, field, feats, c2w, K, t):
        return {"field": field, "setting": self.setting, "views": {"feats": feats, "c2w": c2w, "K": K, "t": t}}

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        B, Nc = ctxt_obs.shape[:2]
        zeros = torch.zeros(B * Nc, dtype=torch.long, device=t.device)
        ctxt_feats = self.ctxt_encoder(ctxt_obs.flatten(0, 1), zeros).unflatten(0, (B, Nc))  # (B, Nc, F, h, w)
        context_only = self.signal(self.context_field, ctxt_feats, ctxt_params["c2w"], ctxt_params["K"],
                                   zeros.view(B, Nc))
        with torch.no_grad():  # 3D-structured conditioning: the context-only field seen from the target camera
            cond = render_image(context_only, trgt_params, self.setting.cond_size)  # (B, 3 + 1 + Cf, c, c)
        cond = F.interpolate(cond, size=noisy_trgt.shape[-2:], mode="bilinear", align_corners=False)
        trgt_feats = self.trgt_encoder(torch.cat([noisy_trgt, cond], dim=1), t)  # (B, F, h, w)
        signal = self.signal(self.field, torch.cat([ctxt_feats, trgt_feats[:, None]], dim=1),
                             torch.cat([ctxt_params["c2w"], trgt_params["c2w"][:, None]], dim=1),
                             torch.cat([ctxt_params["K"], trgt_params["K"][:, None]], dim=1),
                             torch.cat([zeros.view(B, Nc), t[:, None]], dim=1))
        signal["context_only"] = context_only
        return signal

    def aux_loss(self, signal, trgt_obs, trgt_params):
        """The conditioning render's own L2 on a random patch of the target (with gradients), and the
        edge-aware smoothness of the depth of the last patch forward() rendered of this signal."""
        B, size, p = trgt_obs.shape[0], trgt_obs.shape[-1], self.setting.patch
        pixels = random_patches(B, size, p, None).to(trgt_obs.device)
        cond = render_pixels(signal["context_only"], trgt_params, pixels)  # dict rgb (B, 3, P), depth (B, P)
        loss = F.mse_loss(cond["obs"], dfm.select_pixels(trgt_obs, pixels))
        if "patch" in signal and self.setting.depth_smooth > 0:
            depth = signal["patch"]["depth"].view(B, 1, p, p)
            image = dfm.select_pixels(trgt_obs, signal["patch"]["pixels"]).view(B, 3, p, p)
            loss = loss + self.setting.depth_smooth * edge_aware_smoothness(depth, image)
        return loss


def edge_aware_smoothness(depth, image):
    """Mean |gradient of inverse depth|, down-weighted where the image has an edge: (B, 1, p, p), (B, 3, p, p)."""
    inv = 1 / depth.clamp(min=1e-3)
    loss = 0.0
    for dim in (-1, -2):
        d_inv = inv.diff(dim=dim).abs()
        d_img = image.diff(dim=dim).abs().mean(1, keepdim=True)
        loss = loss + (d_inv * torch.exp(-d_img)).mean()
    return loss


# -----------------------------------------------------------------------------
# The forward model: volume rendering of the field


def render_pixels(signal, params, pixels=None, uv=None):
    """Render the field at the given pixels of a camera: params c2w (B, 4, 4), K (B, 3, 3).

    pixels (B, P) indices into the flattened image (default every pixel), or uv (B or 1, P, 2).
    Returns dict obs (B, 3, P) in [-1, 1], depth (B, P) normalised to about [0, 1], feat (B, Cf, P).
    """
    s = signal["setting"]
    if uv is None:
        uv = render.pixel_centers(s.world.size, s.world.size, device=params["K"].device)  # (H*W, 2)
        if pixels is not None:
            uv = uv[pixels]  # (B, P, 2)
    origins, dirs = render.get_rays(params["c2w"], params["K"], uv)  # (B, P, 3)
    origins = origins.expand(params["K"].shape[0], *origins.shape[-2:])
    dirs = dirs.expand_as(origins)
    near, far, depth_lo, depth_range = scene_bounds(s, origins, dirs)  # (B, P), (B, P), scalars

    def field(points):  # (B, P, S, 3) -> sigma (B, P, S), colour and features (B, P, S, 3 + Cf)
        B, P, S = points.shape[:3]
        sigma, rgb, feat = signal["field"](signal["views"], points.reshape(B, P * S, 3))
        return sigma.view(B, P, S), torch.cat([rgb, feat], dim=-1).view(B, P, S, -1)

    training = torch.is_grad_enabled()  # jitter the samples along rays while training, not when looking
    out = render.render_rays(field, origins, dirs, near, far, s.n_samples, s.n_importance,
                             perturb=training, coarse_grad=False)
    color = out["rgb"].transpose(1, 2)  # (B, 3 + Cf, P)
    depth = (out["depth"] - depth_lo) / depth_range  # about [0, 1] over the scene
    return {"obs": 2 * color[:, :3] - 1, "feat": color[:, 3:], "depth": depth}


def scene_bounds(setting, origins, dirs):
    """Where rays (B, P, 3) start and stop: the toy's scene box, or the data set's near/far (setting.bounds).

    Returns near, far (B, P) and the depth range (lo, width) that maps rendered depths to about [0, 1]."""
    if setting.bounds is not None:  # posed images on disk: poses relative to the first context camera
        near, far = setting.bounds
        return (torch.full_like(origins[..., 0], near), torch.full_like(origins[..., 0], far), near, far - near)
    lo, hi = (x.to(origins.device) for x in world_lib.SCENE_BOX)
    near, far = render.intersect_box(origins, dirs, lo, hi)  # (B, P)
    return near, far, setting.world.cam_dist - 1.5, 3.0


def forward(signal, params, pixels=None):
    """The forward model: render the field from a camera, obs (B, 3, H, W), or (B, 3, P) at pixels (B, P).

    A patch rendered with gradients is remembered in the signal, so that aux_loss can
    regularise its depth without rendering it again.
    """
    out = render_pixels(signal, params, pixels)
    if pixels is None:
        size = signal["setting"].world.size
        return out["obs"].unflatten(-1, (size, size))
    if torch.is_grad_enabled() and "patch" not in signal:
        signal["patch"] = {"depth": out["depth"], "pixels": pixels}
    return out["obs"]


def render_image(signal, params, size):
    """The field rendered at size x size: (B, 3 + 1 + Cf, size, size), RGB in [-1, 1], depth, features."""
    uv = render.pixel_centers(size, size, device=params["K"].device)[None]  # (1, size*size, 2)
    out = render_pixels(signal, params, uv=uv)
    image = torch.cat([out["obs"], out["depth"][:, None], out["feat"]], dim=1)  # (B, 4 + Cf, size*size)
    return image.unflatten(-1, (size, size))


# -----------------------------------------------------------------------------
# The toy protocol for each problem name


def make_denoiser(kind, setting=SETTINGS["scenes3d"]):
    if kind == "oracle":
        raise ValueError("scenes3d has no oracle: the signal is a field computed by the networks, not something "
                         "the data hold; train --model dfm or --model deterministic")
    return Denoiser(setting)


def obs_loss(pred, target, setting=SETTINGS["scenes3d"]):
    """L2 on the rendered patches (B, 3, P), plus LPIPS (weight setting.lpips) when its real weights load.

    LPIPS is off in the CPU setting: on a 2-core CPU it cost 0.5-2 s per step on 16 12x12 patches
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
