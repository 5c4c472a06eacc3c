"""3D inverse graphics from one image: the paper's model, small, on the two-tone sphere world.

The world (scenes3d_world.py) is a sphere on a ground square whose back half, never seen by
the context camera, has a colour drawn uniformly from a palette: one image fixes everything
but that colour, so a correct model samples each palette colour for the back equally often.

The model follows the authors' design (RESULTS.md, "3D scenes from one image"):
- An image encoder (a small UNet, pixel-unshuffled to half resolution) gives per-pixel
  features of each context view (at t = 0) and of the noisy target (at t). Before the target is
  encoded, a *context-only* field is rendered at the target camera (RGB, normalised depth,
  features) and concatenated to it: the 3D-structured conditioning.
- The signal (Signal) is a pixel-aligned radiance field: a 3D point is projected into every view
  with render.lookup, the features found there are combined with a positional encoding of the
  point in that camera's frame, modulated by the view's timestep (FiLM), pooled over the views
  that see it and decoded into density, colour and a small feature vector.
- forward(signal, camera) volume-renders that field with render.py: rays start and stop at the
  setting's bounds, stratified samples plus importance samples, the coarse pass without
  gradients. During training only one random patch per target and novel view is rendered
  (`pixels`), which is what keeps the memory small; the patch's depth comes back with it.
- Extra loss terms, the denoiser's aux_loss: the context-only field's own L2 on a random patch of
  the target, and an edge-aware smoothness of the depth of the target's rendered patch.
The comparison model is dfm.Deterministic with the same networks (pixelNeRF-style). There is
no oracle: the signal is a field computed by the networks, not something the data hold.

Problem names: "scenes3d" (32x32, one sphere, sized for a laptop CPU), "scenes3d-64" and
"scenes3d-128" (larger networks, two spheres, for GPUs). The modules depend one way: the world
(scenes3d_world.py), then this model, then the protocol with its scores and pictures
(scenes3d_eval.py, whose problem(name) is what toy_problems.load returns). make_problem builds
the protocol for the toy's scenes and for posed images on disk (posed_images/dataset.py) alike.
"""
import functools
import math
import types
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
N_FREQS = 4  # positional encoding frequencies


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
    field: nn.Module  # ContextField or DenoisingField: (views, points (B, P, 3)) -> sigma, rgb, feat
    views: Views
    setting: Setting


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


class PixelAlignedField(nn.Module):
    """What the two fields share: the per-view part and the decoder.

    Per view, a point (B, P, 3) is projected into the view (render.lookup); the view's feature there
    and the point's position in that camera's frame (positional encoding) go through a FieldBlock
    modulated by the view's timestep. The subclasses pool the views into one vector per point, which
    decode() turns into density, colour and features; each adds its own layers after these, then the
    decoder (decoder_layers): the order in which a seed draws the initial weights and in which a
    checkpoint's optimizer state lists them. Density is softplus(x - 1) rather than the
    authors' ReLU: a ReLU field whose pre-activations all start out negative renders nothing and
    never receives a gradient, which small networks like these can start out as.
    """

    def __init__(self, feat, width, cam_dist):
        super().__init__()
        self.cam_dist = cam_dist  # depths are encoded relative to the cameras' distance from the scene
        self.width = width
        self.inp = nn.Linear(feat + 3 * (1 + 2 * N_FREQS), width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU())
        self.view_block = FieldBlock(width)

    def per_view(self, views, points):
        """Each view's vector for each point: h (B, V, P, width), the timestep embeddings temb (B, V, 1, width)
        and seen (B, V, P), whether the point projects into the view."""
        feats, uv, depth, seen = render.lookup(views.feats, points, views.c2w, views.K)  # (B, V, P, F) ...
        cam = torch.cat([2 * uv - 1, (depth - self.cam_dist)[..., None]], dim=-1)  # (B, V, P, 3) in each camera's frame
        freqs = 2.0 ** torch.arange(N_FREQS, device=points.device) * math.pi / 2
        angles = (cam[..., None] * freqs).flatten(-2)  # (B, V, P, 3 * N_FREQS)
        h = self.inp(torch.cat([feats, cam, angles.sin(), angles.cos()], dim=-1))  # (B, V, P, width)
        temb = self.time(dfm.timestep_embedding(views.t.flatten(), self.width)).view(*views.t.shape, 1, -1)
        return self.view_block(h, temb), temb, seen

    def decode(self, pooled):
        """pooled (B, P, width) -> sigma (B, P) >= 0, rgb (B, P, 3) in [0, 1], feat (B, P, Cf)."""
        out = self.head(self.joint(pooled))
        return F.softplus(out[..., 0] - 1), torch.sigmoid(out[..., 1:4]), out[..., 4:]


def decoder_layers(width, out_feat):
    """The decoder of PixelAlignedField.decode: an MLP and a head of 1 + 3 + Cf outputs."""
    joint = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
    return joint, nn.Linear(width, 1 + 3 + out_feat)


def mean_over_seen(h, seen):
    """The mean of h (B, V, P, width) over the views that see each point (seen (B, V, P)): (B, P, width)."""
    w = seen.float()[..., None]
    return (h * w).sum(1) / w.sum(1).clamp(min=1)


class ContextField(PixelAlignedField):
    """The context-only field: the mean over the context views that see a point. It makes the conditioning
    render, and has weights of its own, as in the authors' model: its regression loss would otherwise pull
    the denoising field's hidden half towards the mean colour."""

    def __init__(self, feat, width, out_feat, cam_dist):
        super().__init__(feat, width, cam_dist)
        self.joint, self.head = decoder_layers(width, out_feat)

    def forward(self, views, points):  # views of V contexts, points (B, P, 3) -> sigma, rgb, feat
        h, _, seen = self.per_view(views, points)
        return self.decode(mean_over_seen(h, seen))


class DenoisingField(PixelAlignedField):
    """The denoising field, the signal: the contexts' mean and the noisy target's own vector, merged.

    The last view is the noisy target. The mean over the contexts that see a point is concatenated
    with the target's vector and its "seen" flag, merged, and modulated once more by the target's
    timestep. A back-half point projects into the context image onto the *front* pixel that hides
    it (render.lookup tests the frustum, not occlusion), so a plain mean over all views would
    average that front colour 50/50 with the target's evidence; kept apart, the network can let
    the target win where it should (experiments/diagnose3d.py measures it: RESULTS.md, 3D scenes).
    """

    def __init__(self, feat, width, out_feat, cam_dist):
        super().__init__(feat, width, cam_dist)
        self.merge = nn.Linear(2 * width + 1, width)  # [mean of contexts, target, target sees the point]
        self.target_block = FieldBlock(width)  # after merging, modulated by the target's timestep
        self.joint, self.head = decoder_layers(width, out_feat)

    def forward(self, views, points):  # views of Nc contexts and the target last, points (B, P, 3)
        h, temb, seen = self.per_view(views, points)  # (B, Nc + 1, P, width), ...
        seen_trgt = seen[:, -1].float()[..., None]  # (B, P, 1)
        merged = self.merge(torch.cat([mean_over_seen(h[:, :-1], seen[:, :-1]), h[:, -1] * seen_trgt, seen_trgt], -1))
        return self.decode(self.target_block(merged, temb[:, -1]))  # (B, P, width) -> sigma, rgb, feat


class Denoiser(nn.Module):
    """(context views, noisy target, cameras, t) -> the signal: the denoising field over the contexts and the
    target (the target last), rendered at the target camera by forward()."""

    def __init__(self, setting):
        super().__init__()
        s = self.setting = setting
        self.ctxt_encoder = Encoder(3, s.ch, s.feat)
        self.trgt_encoder = Encoder(3 + 3 + 1 + s.out_feat, s.ch, s.feat)  # noisy target + conditioning render
        self.context_field = ContextField(s.feat, s.width, s.out_feat, s.world.cam_dist)
        self.field = DenoisingField(s.feat, s.width, s.out_feat, s.world.cam_dist)

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        B, Nc = ctxt_obs.shape[:2]
        zeros = torch.zeros(B * Nc, dtype=torch.long, device=t.device)
        ctxt_feats = self.ctxt_encoder(ctxt_obs.flatten(0, 1), zeros).unflatten(0, (B, Nc))  # (B, Nc, F, h, w)
        contexts = Views(ctxt_feats, ctxt_params["c2w"], ctxt_params["K"], zeros.view(B, Nc))
        with torch.no_grad():  # 3D-structured conditioning: the context-only field seen from the target camera
            cond = render_image(Signal(self.context_field, contexts, self.setting), trgt_params, self.setting.cond_size)
        cond = F.interpolate(cond, size=noisy_trgt.shape[-2:], mode="bilinear", align_corners=False)  # (B, 4+Cf, H, W)
        trgt_feats = self.trgt_encoder(torch.cat([noisy_trgt, cond], dim=1), t)  # (B, F, h, w)
        views = Views(torch.cat([ctxt_feats, trgt_feats[:, None]], dim=1),  # (B, Nc + 1, F, h, w)
                      torch.cat([ctxt_params["c2w"], trgt_params["c2w"][:, None]], dim=1),
                      torch.cat([ctxt_params["K"], trgt_params["K"][:, None]], dim=1),
                      torch.cat([zeros.view(B, Nc), t[:, None]], dim=1))
        return Signal(self.field, views, self.setting)

    def aux_loss(self, signal, trgt_obs, trgt_params, pixels, depth):
        """The terms dfm.DFM.loss adds through its aux hook: the context-only field, rendered with gradients at a
        random patch of the target camera, against the target (the conditioning must explain what it sees); and
        the edge-aware smoothness of the depth (B, P) of the target patch `pixels` (B, P) that the loss rendered."""
        B, size, p = trgt_obs.shape[0], trgt_obs.shape[-1], self.setting.patch
        contexts = signal.views.map(lambda v: v[:, :-1])  # every view but the target, the last
        cond_pixels = random_patches(B, size, p, None).to(trgt_obs.device)
        cond = render_pixels(Signal(self.context_field, contexts, self.setting), trgt_params, cond_pixels)
        loss = F.mse_loss(cond["obs"], dfm.select_pixels(trgt_obs, cond_pixels))
        if depth is not None and self.setting.depth_smooth > 0:
            image = dfm.select_pixels(trgt_obs, pixels).view(B, 3, p, p)
            loss = loss + self.setting.depth_smooth * edge_aware_smoothness(depth.view(B, 1, p, p), image)
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
# The toy protocol, for the toy's scenes and for posed images on disk


def make_problem(name, setting, **data):
    """The toy protocol (toy_problems/__init__.py) of the 3D model of problem `name` at `setting`: the model's
    parts, and the data's given as keywords (sample_batch, held_out_batch, evaluate, plot, animate; and
    exact_posterior for the toy's scenes, loader for posed images on disk). The one place both are built:
    scenes3d_eval.problem and posed_images/problem.make_problem call it."""
    return types.SimpleNamespace(NAME=name, SETTING=setting, TRAIN_DEFAULTS=TRAIN_DEFAULTS[name], forward=forward,
                                 obs_loss=functools.partial(obs_loss, setting=setting),
                                 make_denoiser=functools.partial(make_denoiser, setting=setting), **data)


def make_denoiser(kind, setting=SETTINGS["scenes3d"]):
    if kind == "oracle":
        raise ValueError("scenes3d has no oracle: the signal is a field computed by the networks, not something "
                         "the data hold; train --model dfm or --model deterministic")
    return Denoiser(setting)


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
