"""Single-image motion prediction: which way will the sprites move?

A frame of H x W = 20 x 20 pixels shows K = 2 sprites (a red square and a blue diamond)
on a grey background. Between this frame and the next, each sprite moves by one of four
displacements (2 pixels right, left, down or up), drawn independently and uniformly. The
first frame says nothing about the motion, so given it, all 4 x 4 = 16 combinations are
exactly equally likely: that is the exact posterior.

The signal is a motion field m (2, H, W) in pixels, defined on the grid of the *next*
frame: pixel p of the next frame came from p - m(p) in the first frame. The forward model
is that backward warp (bilinear, differentiable in m); its params are the first frame:

    next(p) = first(p - m(p))

The ground-truth field is the sprite's displacement on the sprite's old and new footprint
and zero elsewhere; pixels the sprite uncovers then look 2 pixels further back, onto the
background, so warping the first frame reproduces the next one exactly. Sprites are placed
with a gap, so that these footprints never touch.

A deterministic model can only predict the average motion, about zero, and a smeared frame;
DFM should pick one of the allowed motions per sprite, in the right proportions.
"""
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import dfm
import toy_problems

H = W = 20  # image size
SIZE = 4  # sprite size in pixels
STEP = 2  # how far a sprite moves
MARGIN = STEP  # free pixels between a sprite and the image border
BACKGROUND = torch.tensor([-0.5, -0.5, -0.5])
COLOURS = torch.tensor([[0.9, -0.8, -0.8], [-0.8, -0.2, 0.9]])  # (K, 3) red, blue
SHAPES = torch.tensor([  # (K, SIZE, SIZE) a square and a diamond
    [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]],
    [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]],
]).float()
K = len(COLOURS)  # sprites per image
MOVES = torch.tensor([[STEP, 0], [-STEP, 0], [0, STEP], [0, -STEP]]).float()  # (4, 2) (dx, dy): right, left, down, up
MOVE_NAMES = ["right", "left", "down", "up"]
SIGNAL_SHAPE = (2, H, W)

TRAIN_DEFAULTS = dict(steps=3000, batch_size=32, lr=1e-3)


# -----------------------------------------------------------------------------
# Forward model


def warp(image, motion, mode="bilinear"):
    """Backward warp: out(p) = image(p - motion(p)), bilinear (or as `mode` says), border padding.

    image (B, C, H, W), motion (B, 2, H, W) in pixels (dx, dy) -> (B, C, H, W).
    """
    ys, xs = torch.meshgrid(torch.arange(H, device=image.device), torch.arange(W, device=image.device), indexing="ij")
    x = xs - motion[:, 0]  # (B, H, W) where each output pixel reads from
    y = ys - motion[:, 1]
    grid = torch.stack([2 * x / (W - 1) - 1, 2 * y / (H - 1) - 1], dim=-1)  # (B, H, W, 2) in [-1, 1]
    return F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)


def forward(signal, params):
    """The next frame: signal (B, 2, H, W) motion field, params (B, 3, H, W) first frame -> (B, 3, H, W)."""
    return warp(params, signal)


FORWARD_ERRORS = ("nearest",)


def forward_with_error(kind, size):
    """A warp with another interpolation (study 2 of experiments/study.py): nearest: the next frame is
    (1 - size) x the bilinear warp + size x a nearest-neighbour warp, size in [0, 1]. The
    nearest-neighbour part passes no gradient to the motion field, so at size 1 nothing is learnt."""
    if kind not in FORWARD_ERRORS:
        raise ValueError(f"unknown forward error {kind!r} for motion: expected one of {', '.join(FORWARD_ERRORS)}")
    if not 0 <= size <= 1:
        raise ValueError(f"--forward-error-size for nearest must be a share in [0, 1], got {size}")

    return lambda signal, params: (1 - size) * warp(params, signal) + size * warp(params, signal, mode="nearest")


# -----------------------------------------------------------------------------
# Data


def paint(masks):
    """Frames from sprite masks: masks (B, K, H, W) in {0, 1} -> images (B, 3, H, W) in [-1, 1]."""
    image = BACKGROUND.to(masks.device).view(1, 3, 1, 1).expand(masks.shape[0], 3, H, W)
    for k in range(K):
        image = torch.where(masks[:, k:k + 1] > 0.5, COLOURS[k].to(masks.device).view(1, 3, 1, 1), image)
    return image


def sprite_masks(frame):
    """Read each sprite's pixels off a frame by its colour: (B, 3, H, W) -> (B, K, H, W) in {0, 1}."""
    dist = (frame[:, None] - COLOURS.to(frame.device)[None, :, :, None, None]).abs().amax(dim=2)  # (B, K, H, W)
    return (dist < 0.1).float()


def random_masks(batch_size, generator):
    """Place K sprites at random, far enough apart that their moved footprints never touch: (B, K, H, W)."""
    masks = torch.zeros(batch_size, K, H, W)
    lo, hi = MARGIN, W - MARGIN - SIZE  # top-left corners keep the sprite and its motion inside the image
    for b in range(batch_size):
        while True:
            corners = torch.randint(lo, hi + 1, (K, 2), generator=generator)  # (K, 2) (x, y)
            gaps = (corners[:, None] - corners[None]).abs().amax(dim=-1)  # (K, K) largest axis distance
            if bool((gaps + torch.eye(K, dtype=torch.long) * 99 >= SIZE + 2 * STEP).all()):
                break
        for k, (x, y) in enumerate(corners.tolist()):
            masks[b, k, y:y + SIZE, x:x + SIZE] = SHAPES[k]
    return masks


def shift(masks, moves):
    """Move each mask by an integer displacement: masks (B, K, H, W), moves (B, K) index into MOVES."""
    out = torch.zeros_like(masks)
    for j, (dx, dy) in enumerate(MOVES.long().tolist()):
        chosen = (moves == j).float()[..., None, None]  # (B, K, 1, 1)
        out = out + chosen * torch.roll(masks, shifts=(dy, dx), dims=(-2, -1))
    return out


def motion_field(masks, moves):
    """The ground-truth field: each sprite's displacement on its old and new footprint, 0 elsewhere.

    masks (B, K, H, W) first-frame sprites, moves (B, K) index into MOVES -> (B, 2, H, W).
    """
    footprint = torch.maximum(masks, shift(masks, moves))  # (B, K, H, W)
    displacement = MOVES.to(masks.device)[moves]  # (B, K, 2)
    return torch.einsum("bkhw,bkc->bchw", footprint, displacement)


def sample_batch(batch_size, generator, device="cpu"):
    """First frame as context, next frame as target; params of both are the first frame (it is what gets warped)."""
    masks = random_masks(batch_size, generator)  # (B, K, H, W)
    moves = torch.randint(0, len(MOVES), (batch_size, K), generator=generator)  # (B, K) uniform, independent
    first = paint(masks)  # (B, 3, H, W)
    nxt = paint(shift(masks, moves))  # (B, 3, H, W)
    batch = dict(ctxt_obs=first.unsqueeze(1), ctxt_params=first.unsqueeze(1),  # (B, 1, 3, H, W): first = warp(first, 0)
                 trgt_obs=nxt, trgt_params=first, signal=motion_field(masks, moves))
    return {k: v.to(device) for k, v in batch.items()}


def held_out_batch(n_contexts, seed=0, device="cpu"):
    """Fixed evaluation contexts, from a seed stream that training never uses."""
    return sample_batch(n_contexts, toy_problems.held_out_generator(seed), device)


# -----------------------------------------------------------------------------
# The default denoiser: a small UNet


class Denoiser(nn.Module):
    """UNet over [first frame, noisy next frame] -> motion field (B, 2, H, W), one downsampling level.

    For the oracle the noisy input is the noisy motion field itself (2 channels instead of 3).
    """

    def __init__(self, oracle=False, ch=32):
        super().__init__()
        self.ch = ch
        self.time = nn.Sequential(nn.Linear(ch, 2 * ch), nn.SiLU(), nn.Linear(2 * ch, 2 * ch))
        self.inp = nn.Conv2d(3 + (2 if oracle else 3), ch, 3, padding=1)
        self.enc = dfm.ResBlock2d(ch, ch)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)  # H/2: sees a whole sprite and its motion
        self.mid = nn.ModuleList([dfm.ResBlock2d(2 * ch, 2 * ch), dfm.ResBlock2d(2 * ch, 2 * ch)])
        self.up = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.dec = dfm.ResBlock2d(ch, ch)
        self.out = nn.Conv2d(2 * ch, 2, 3, padding=1)
        self.temb_down = nn.Linear(2 * ch, ch)

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        temb = self.time(dfm.timestep_embedding(t, self.ch))  # (B, 2ch)
        temb_hi = self.temb_down(temb)  # (B, ch) for the full-resolution blocks
        h0 = self.enc(self.inp(torch.cat([ctxt_obs[:, 0], noisy_trgt], dim=1)), temb_hi)  # (B, ch, H, W)
        h = self.down(h0)  # (B, 2ch, H/2, W/2)
        for block in self.mid:
            h = block(h, temb)
        h = self.up(F.interpolate(h, size=(H, W), mode="nearest"))  # (B, ch, H, W)
        h = self.dec(h, temb_hi)
        return STEP * self.out(F.silu(torch.cat([h, h0], dim=1)))  # (B, 2, H, W) in pixels


def make_denoiser(kind):
    return Denoiser(oracle=(kind == "oracle"))


# -----------------------------------------------------------------------------
# The exact posterior and scores


def exact_posterior(ctxt_obs, ctxt_params, n_samples, generator):
    """Exact samples of p(motion | first frame): every sprite moves independently and uniformly.

    ctxt_obs (B, 1, 3, H, W) -> (B, n, 2, H, W).
    """
    B = ctxt_obs.shape[0]
    masks = sprite_masks(ctxt_obs[:, 0]).repeat_interleave(n_samples, dim=0)  # (B*n, K, H, W)
    moves = torch.randint(0, len(MOVES), (B * n_samples, K), generator=generator).to(masks.device)  # (B*n, K)
    return motion_field(masks, moves).view(B, n_samples, *SIGNAL_SHAPE)


def read_moves(motion, first):
    """Each sprite's displacement, read off a motion field: motion (N, 2, H, W), first (N, 3, H, W) -> (N, K, 2).

    It is the mean of the field over the pixels the sprite lands on (its first-frame mask,
    warped by the field), so the field on the empty background does not count.
    """
    landed = warp(sprite_masks(first), motion)  # (N, K, H, W)
    weights = landed / landed.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
    return torch.einsum("nkhw,nchw->nkc", weights, motion)


def classify(displacements):
    """Nearest allowed move (0..3), or 4 ("none") when more than STEP/2 away: (N, K, 2) -> (N, K), distance (N, K)."""
    dist = (displacements[:, :, None] - MOVES.to(displacements.device)).norm(dim=-1)  # (N, K, 4)
    nearest, index = dist.min(dim=-1)
    return torch.where(nearest < STEP / 2, index, torch.full_like(index, len(MOVES))), nearest


def motion_scores(samples, first):
    """Scores of a sample set against the exact posterior: samples (B, n, 2, H, W), first (B, 3, H, W).

    tv_sprite: total variation between the sampled distribution of one sprite's move (4
        moves + "none") and the exact uniform one, averaged over sprites and contexts.
    tv_joint: the same over the 16 joint moves (+ "none").
    off_grid: mean distance in pixels from a sampled move to the nearest allowed one.
    """
    B, n = samples.shape[:2]
    moves = read_moves(samples.flatten(0, 1), first.repeat_interleave(n, dim=0))  # (B*n, K, 2)
    label, dist = classify(moves)  # (B*n, K)
    label, dist = label.view(B, n, K), dist.view(B, n, K)
    nm = len(MOVES)
    sprite_hist = F.one_hot(label, nm + 1).float().mean(dim=1)  # (B, K, 5)
    exact_sprite = torch.tensor([1 / nm] * nm + [0.0], device=samples.device)
    place = nm ** torch.arange(K - 1, -1, -1, device=label.device)  # joint move = K-digit number in base 4
    joint = torch.where((label < nm).all(dim=-1), (label * place).sum(-1), nm ** K)  # (B, n)
    joint_hist = F.one_hot(joint, nm ** K + 1).float().mean(dim=1)  # (B, 4^K + 1)
    exact_joint = torch.tensor([1 / nm ** K] * nm ** K + [0.0], device=samples.device)
    return {"tv_sprite": 0.5 * (sprite_hist - exact_sprite).abs().sum(-1).mean().item(),
            "tv_joint": 0.5 * (joint_hist - exact_joint).abs().sum(-1).mean().item(),
            "off_grid": dist.mean().item()}


def evaluate(model, seed=0, n_contexts=16, n_samples=64, steps=50):
    """Distribution scores against the exact posterior, their floor, and the pixel error of the next frame.

    The floor is the score of n_samples exact samples: what a perfect sampler gets with this
    many samples. frame_mse (vs the one true next frame) is a pixel score, which the
    conditional mean, i.e. the deterministic model, is expected to win.
    """
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    samples = dfm.sample_signals(model, batch, n_samples, generator, steps)  # (B, n, 2, H, W)
    exact = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, torch.Generator().manual_seed(seed))
    first = batch["trgt_params"]
    frames = forward(samples.flatten(0, 1), first.repeat_interleave(n_samples, dim=0))  # (B*n, 3, H, W)
    true_next = batch["trgt_obs"].repeat_interleave(n_samples, dim=0)
    scores = motion_scores(samples, first)
    floor = motion_scores(exact.to(device), first)
    return {**scores, **{k + "_floor": v for k, v in floor.items()},
            "frame_mse": F.mse_loss(frames, true_next).item()}


# -----------------------------------------------------------------------------
# Pictures


def to_rgb(image):
    return ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def plot(model, path, seed=0, n_contexts=3, n_samples=4, steps=50):
    """For each context: the first frame, then sampled motion fields (arrows) over their predicted next frames."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    model.eval()
    samples = dfm.sample_signals(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps)
    first = batch["trgt_params"]  # (B, 3, H, W)
    fig, axes = plt.subplots(n_contexts, n_samples + 1, figsize=(1.9 * (n_samples + 1), 2.0 * n_contexts))
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for i in range(n_contexts):
        axes[i, 0].imshow(to_rgb(first[i]))
        axes[i, 0].set_title("first frame" if i == 0 else "", fontsize=9)
        firsts = first[i:i + 1].expand(n_samples, -1, -1, -1)  # (n, 3, H, W)
        frames = forward(samples[i], firsts)  # (n, 3, H, W)
        moves, _ = classify(read_moves(samples[i], firsts))  # (n, K)
        for j in range(n_samples):
            ax = axes[i, j + 1]
            ax.imshow(to_rgb(frames[j]))
            m = samples[i, j].cpu()  # (2, H, W)
            # white: where a sprite lands, the part the next frame pins down; grey: the free field on the
            # uniform background, which any value explains equally well
            on_sprite = warp(sprite_masks(firsts[j:j + 1]), samples[i, j:j + 1])[0].sum(0).cpu() > 0.5
            for shown, colour in ((~on_sprite & (m.norm(dim=0) > 0.3), "0.6"), (on_sprite, "white")):
                ax.quiver(xs[shown], ys[shown], m[0][shown], -m[1][shown], color=colour, scale=STEP * 12, width=0.012)
            names = ["?" if c == len(MOVES) else MOVE_NAMES[c] for c in moves[j].tolist()]
            ax.set_title(" / ".join(names), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"motion prediction, {model.kind}: sampled motion (arrows; grey = on the empty background) and "
                 "predicted next frame; titles: red / blue sprite's move", fontsize=9)
    fig.tight_layout()
    toy_problems.save_figure(fig, path)
