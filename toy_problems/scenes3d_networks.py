"""The 3D model's networks: the denoiser that turns context views and a noisy target into the signal.

The signal (scenes3d.Signal) is a pixel-aligned radiance field: a 3D point is projected into every
view with render.lookup, the features found there are combined with a positional encoding of the
point in that camera's frame, modulated by the view's timestep (FiLM), pooled over the views that
see it and decoded into density, colour and a small feature vector. The denoiser (Denoiser):
- an image encoder (a small UNet at half resolution, unfolded back to the image's with the
  setting's full_res) gives per-pixel features of each context view (at t = 0) and of the noisy
  target (at t);
- before the target is encoded, a *context-only* field is rendered at the target camera (RGB,
  normalised depth, features) and concatenated to it: the 3D-structured conditioning;
- the denoising field over the contexts and the target is the signal, which scenes3d.forward
  renders.
Its aux_loss adds the context-only field's own L2 on a random patch of the target and an
edge-aware smoothness of the depth of the target's rendered patch.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import dfm
import render
from toy_problems import scenes3d

N_FREQS = 4  # positional encoding frequencies


class Encoder(nn.Module):
    """A small timestep-conditioned UNet: (B, C_in, H, W) -> features (B, F, H/2, W/2), or (B, F, H, W) full_res.

    2x2 pixels are folded into channels first (pixel unshuffle), which keeps it cheap on a CPU;
    then one level down and back up, with a skip connection. With full_res the last layer unfolds
    the features back to the image's resolution and sees the input's own pixels beside them: a
    half-resolution copy of a thin part's colours is already most of the way to a blur
    (experiments/diagnose3d.py, the mesh check).
    """

    def __init__(self, c_in, ch, feat, full_res=False):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(ch, 2 * ch), nn.SiLU(), nn.Linear(2 * ch, 2 * ch))
        self.inp = nn.Conv2d(4 * c_in, ch, 3, padding=1)
        self.enc = dfm.ResBlock2d(ch, 2 * ch)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = dfm.ResBlock2d(2 * ch, 2 * ch)
        self.up = nn.Conv2d(3 * ch, ch, 3, padding=1)
        self.dec = dfm.ResBlock2d(ch, 2 * ch)
        self.out = nn.Conv2d(ch // 4 + c_in, feat, 3, padding=1) if full_res else nn.Conv2d(ch, feat, 1)
        self.ch, self.full_res = ch, full_res

    def forward(self, x, t):  # x (B, C_in, H, W), t (B,)
        temb = self.time(dfm.timestep_embedding(t, self.ch))  # (B, 2ch)
        h1 = self.enc(self.inp(F.pixel_unshuffle(x, 2)), temb)  # (B, ch, H/2, W/2)
        h = self.mid(self.down(h1), temb)  # (B, 2ch, H/4, W/4)
        h = F.silu(self.dec(self.up(torch.cat([F.interpolate(h, size=h1.shape[-2:]), h1], dim=1)), temb))
        if self.full_res:
            h = torch.cat([F.pixel_shuffle(h, 2), x], dim=1)  # (B, ch/4 + C_in, H, W)
        return self.out(h)  # (B, F, H/2, W/2), or (B, F, H, W) full_res


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
        self.ctxt_encoder = Encoder(3, s.ch, s.feat, s.full_res)
        self.trgt_encoder = Encoder(3 + 3 + 1 + s.out_feat, s.ch, s.feat, s.full_res)  # noisy target + conditioning
        self.context_field = ContextField(s.feat, s.width, s.out_feat, s.world.cam_dist)
        self.field = DenoisingField(s.feat, s.width, s.out_feat, s.world.cam_dist)

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        B, Nc = ctxt_obs.shape[:2]
        zeros = torch.zeros(B * Nc, dtype=torch.long, device=t.device)
        ctxt_feats = self.ctxt_encoder(ctxt_obs.flatten(0, 1), zeros).unflatten(0, (B, Nc))  # (B, Nc, F, h, w)
        contexts = scenes3d.Views(ctxt_feats, ctxt_params["c2w"], ctxt_params["K"], zeros.view(B, Nc))
        with torch.no_grad():  # 3D-structured conditioning: the context-only field seen from the target camera
            context_only = scenes3d.Signal(self.context_field, contexts, self.setting)
            cond = scenes3d.render_image(context_only, trgt_params, self.setting.cond_size)
        cond = F.interpolate(cond, size=noisy_trgt.shape[-2:], mode="bilinear", align_corners=False)  # (B, 4+Cf, H, W)
        trgt_feats = self.trgt_encoder(torch.cat([noisy_trgt, cond], dim=1), t)  # (B, F, h, w)
        views = scenes3d.Views(torch.cat([ctxt_feats, trgt_feats[:, None]], dim=1),  # (B, Nc + 1, F, h, w)
                      torch.cat([ctxt_params["c2w"], trgt_params["c2w"][:, None]], dim=1),
                      torch.cat([ctxt_params["K"], trgt_params["K"][:, None]], dim=1),
                      torch.cat([zeros.view(B, Nc), t[:, None]], dim=1))
        return scenes3d.Signal(self.field, views, self.setting)

    def aux_loss(self, signal, trgt_obs, trgt_params, pixels, depth):
        """The terms dfm.DFM.loss adds through its aux hook: the context-only field, rendered with gradients at a
        random patch of the target camera, against the target (the conditioning must explain what it sees); and
        the edge-aware smoothness of the depth (B, P) of the target patch `pixels` (B, P) that the loss rendered."""
        B, size, p = trgt_obs.shape[0], trgt_obs.shape[-1], self.setting.patch
        contexts = signal.views.map(lambda v: v[:, :-1])  # every view but the target, the last
        cond_pixels = scenes3d.random_patches(B, size, p, None).to(trgt_obs.device)
        context_only = scenes3d.Signal(self.context_field, contexts, self.setting)
        cond = scenes3d.render_pixels(context_only, trgt_params, cond_pixels)
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


def make_denoiser(kind, setting=scenes3d.SETTINGS["scenes3d"]):
    """The denoiser of DFM and of the deterministic model (the same networks); there is no oracle."""
    if kind == "oracle":
        raise ValueError("scenes3d has no oracle: the signal is a field computed by the networks, not something "
                         "the data hold; train --model dfm or --model deterministic")
    return Denoiser(setting)
