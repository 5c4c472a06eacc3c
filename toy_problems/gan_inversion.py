"""GAN inversion: which latent code made this half-visible image?

The signal is a latent code z of D = 8 numbers. A fixed, known, differentiable generator
turns it into a 3 x 16 x 16 image, and the forward model shows that image through a mask
(the params): obs = G(z) * mask. A context is the image through one half (left or
right), the target the image through the other half.

The generator is built so that the posterior is known exactly:

    G(z) = tanh(sum_i z_i * B_i)        B_i: fixed basis images (3, H, W)

    z[0:2]  shared: a colour tint and horizontal stripes over the whole image
    z[2:5]  left:   three coloured bumps that live only in the left half
    z[5:8]  right:  three coloured bumps that live only in the right half

Each z_i is drawn from a bimodal prior, +-1 (equally likely) plus N(0, 0.25^2) noise, so
the posterior mean (zero: no bumps) is visibly not a sample. Seeing one half pins down the
shared latents and that half's bumps exactly (tanh is invertible and the visible bases are
linearly independent, so least squares on atanh(pixels) recovers them), while the other
half's three latents are untouched by the observation and follow the prior: 2^3 modes.
"""
import math

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn

import dfm
import toy_problems

H = W = 16  # image size
D = 8  # latent size
SHARED, LEFT, RIGHT = [0, 1], [2, 3, 4], [5, 6, 7]  # which latents act where
MODE, SPREAD = 1.0, 0.25  # prior of every latent: +-MODE + N(0, SPREAD^2)
SIGNAL_SHAPE = (D,)

TRAIN_DEFAULTS = dict(steps=6000, batch_size=64, lr=1e-3, lr_schedule="cosine")


def make_bases():
    """The generator's fixed basis images: (D, 3, H, W)."""
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    left = (xs < W // 2).float()  # (H, W)
    bases = torch.zeros(D, 3, H, W)
    bases[0] = 0.4 * torch.tensor([1.0, 0.2, -1.0]).view(3, 1, 1)  # warm or cold tint, everywhere
    bases[1] = 0.5 * torch.sin(2 * math.pi * ys / 8).expand(3, H, W)  # stripes across both halves
    bump_colours = torch.tensor([[1.0, -0.3, -0.3], [-0.3, 1.0, -0.3], [-0.3, -0.3, 1.0]])  # red, green, blue
    bump_centres = [(3.5, 4.0), (8.0, 2.5), (12.0, 5.0)]  # (y, x) in the left half; mirrored on the right
    for j, ((cy, cx), colour) in enumerate(zip(bump_centres, bump_colours)):
        for i, (x0, half) in zip((LEFT[j], RIGHT[j]), ((cx, left), (W - 1 - cx, 1 - left))):
            bump = torch.exp(-((ys - cy) ** 2 + (xs - x0) ** 2) / (2 * 1.5 ** 2)) * half  # cut at the midline
            bases[i] = 0.9 * colour.view(3, 1, 1) * bump
    return bases


BASES = make_bases()
LEFT_MASK = torch.zeros(1, H, W)
LEFT_MASK[..., :W // 2] = 1
RIGHT_MASK = 1 - LEFT_MASK


# -----------------------------------------------------------------------------
# Generator, forward model and data


def generate(z):
    """The generator: z (B, D) -> images (B, 3, H, W) in (-1, 1)."""
    return torch.tanh(torch.einsum("bd,dchw->bchw", z, BASES.to(z)))


def forward(signal, params):
    """The image seen through a mask: signal (B, D) latent, params (B, 1, H, W) mask -> (B, 3, H, W)."""
    return generate(signal) * params


def sample_prior(n, generator):
    """Latents from the bimodal prior: (n, D)."""
    signs = torch.randint(0, 2, (n, D), generator=generator).float() * 2 - 1
    return MODE * signs + SPREAD * torch.randn(n, D, generator=generator)


def sample_batch(batch_size, generator, device="cpu"):
    """Context: one half of G(z); target: the other half; novel view: the whole image."""
    z = sample_prior(batch_size, generator)  # (B, D)
    ctxt_left = torch.rand(batch_size, generator=generator) < 0.5  # (B,)
    ctxt_mask = torch.where(ctxt_left.view(-1, 1, 1, 1), LEFT_MASK, RIGHT_MASK)  # (B, 1, H, W)
    trgt_mask = 1 - ctxt_mask
    full = torch.ones_like(ctxt_mask)
    batch = dict(ctxt_obs=forward(z, ctxt_mask).unsqueeze(1), ctxt_params=ctxt_mask.unsqueeze(1),  # (B, 1, ...)
                 trgt_obs=forward(z, trgt_mask), trgt_params=trgt_mask,
                 novel_obs=forward(z, full), novel_params=full, signal=z)
    return {k: v.to(device) for k, v in batch.items()}


def held_out_batch(n_contexts, seed=0, device="cpu"):
    """Fixed evaluation contexts, from a seed stream that training never uses."""
    return sample_batch(n_contexts, toy_problems.held_out_generator(seed), device)


# -----------------------------------------------------------------------------
# The default denoiser: a small CNN encoder and an MLP over the latent


class ResBlock(nn.Module):
    """Pre-norm residual MLP block, modulated by the timestep (FiLM)."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(width, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h, temb):
        scale, shift = self.film(temb).chunk(2, dim=1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class Denoiser(nn.Module):
    """CNN over [context image, its mask, noisy target image, its mask], then an MLP -> latent (B, D).

    For the oracle the noisy input is the noisy latent itself, fed to the MLP beside the
    context features (the CNN then sees only the context and its mask).
    """

    def __init__(self, oracle=False, width=256, depth=3):
        super().__init__()
        self.oracle = oracle
        self.encoder = nn.Sequential(  # (B, C, 16, 16) -> (B, 64 * 4 * 4)
            nn.Conv2d(4 if oracle else 8, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten())
        self.inp = nn.Linear(64 * 4 * 4 + (D if oracle else 0), width)
        self.time = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, D))

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        images = [ctxt_obs[:, 0], ctxt_params[:, 0]]  # (B, 3, H, W), (B, 1, H, W)
        if not self.oracle:
            images += [noisy_trgt, trgt_params]
        h = self.encoder(torch.cat(images, dim=1))  # (B, 1024)
        if self.oracle:
            h = torch.cat([h, noisy_trgt], dim=1)  # (B, 1024 + D)
        h = self.inp(h)  # (B, width)
        temb = self.time(dfm.timestep_embedding(t))  # (B, width)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)  # (B, D)


def make_denoiser(kind):
    return Denoiser(oracle=(kind == "oracle"))


# -----------------------------------------------------------------------------
# The exact posterior


def hidden_latents(mask):
    """Which latents the visible region says nothing about: mask (B, 1, H, W) -> bool (B, D)."""
    reach = BASES.to(mask).abs().sum(dim=1, keepdim=True) > 0  # (D, 1, H, W) where each latent acts
    return ~((reach[None] * (mask[:, None] > 0.5)).flatten(2).any(dim=-1))  # (B, D)


def invert(obs, mask):
    """The latents the visible region does determine, by least squares on atanh(pixels).

    obs (B, 3, H, W), mask (B, 1, H, W) -> z (B, D) with the hidden latents set to 0, float64.
    """
    B = obs.shape[0]
    hidden = hidden_latents(mask).cpu()  # (B, D)
    bases = BASES.double().flatten(1)  # (D, 3HW)
    pre = torch.atanh(obs.double().cpu().clamp(-1 + 1e-12, 1 - 1e-12)).flatten(1)  # (B, 3HW) = z @ bases where seen
    seen = (mask.cpu() > 0.5).expand(B, 3, H, W).flatten(1)  # (B, 3HW)
    z = torch.zeros(B, D, dtype=torch.float64)
    for b in range(B):
        known = ~hidden[b]
        A = bases[known][:, seen[b]].T  # (pixels, known latents)
        z[b, known] = torch.linalg.lstsq(A, pre[b, seen[b]].unsqueeze(1)).solution[:, 0]
    return z


def exact_posterior(ctxt_obs, ctxt_params, n_samples, generator):
    """Exact samples of p(z | context): seen latents as inverted, hidden ones from the prior.

    ctxt_obs (B, 1, 3, H, W), ctxt_params (B, 1, 1, H, W) -> (B, n, D).
    """
    B = ctxt_obs.shape[0]
    known = invert(ctxt_obs[:, 0], ctxt_params[:, 0]).float()  # (B, D)
    hidden = hidden_latents(ctxt_params[:, 0]).cpu()  # (B, D)
    prior = sample_prior(B * n_samples, generator).view(B, n_samples, D)
    z = torch.where(hidden[:, None], prior, known[:, None])  # (B, n, D)
    return z.to(ctxt_obs.device)


# -----------------------------------------------------------------------------
# Scores and pictures


def gan_scores(samples, exact, ctxt_obs, ctxt_params):
    """Energy distances of a latent sample set to exact samples, and the error on the seen region.

    samples, exact (B, n, D). latent: all D latents; hidden: the 3 latents the context
    does not see; image: the completed images G(z) (3HW numbers); seen_mse: how far the
    completions are from the context where it is visible.
    """
    B, n = samples.shape[:2]
    hidden = hidden_latents(ctxt_params[:, 0])  # (B, D)
    pick = lambda z: z[hidden[:, None].expand(B, n, D)].view(B, n, -1)  # (B, n, 3)
    images = lambda z: generate(z.flatten(0, 1)).view(B, n, -1)  # (B, n, 3HW)
    mask = dfm.repeat_batch(ctxt_params[:, 0], n)  # (B*n, 1, H, W)
    err = (forward(samples.flatten(0, 1), mask) - dfm.repeat_batch(ctxt_obs[:, 0], n)) ** 2  # (B*n, 3, H, W)
    return {"latent": dfm.energy_distance(samples, exact).mean().item(),
            "hidden": dfm.energy_distance(pick(samples), pick(exact)).mean().item(),
            "image": dfm.energy_distance(images(samples), images(exact)).mean().item(),
            "seen_mse": (err.sum() / (3 * mask.sum())).item()}


def evaluate(model, seed=0, n_contexts=32, n_samples=64, steps=50):
    """Scores against the exact posterior, each with its floor (two independent exact sample sets)."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    model.eval()
    samples = dfm.sample_signals(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps)
    cpu = torch.Generator().manual_seed(seed)
    exact_a = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, cpu)
    exact_b = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, cpu)
    scores = gan_scores(samples, exact_a, batch["ctxt_obs"], batch["ctxt_params"])
    floor = gan_scores(exact_b, exact_a, batch["ctxt_obs"], batch["ctxt_params"])
    return {**scores, **{k + "_floor": v for k, v in floor.items() if k != "seen_mse"}}


def to_rgb(image):
    return ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def plot(model, path, seed=0, n_contexts=3, n_samples=5, steps=50):
    """Per context: masked input, the true image, model completions, exact completions, and hidden latents."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    model.eval()
    n_scatter = 64
    samples = dfm.sample_signals(model, batch, n_scatter, torch.Generator(device=device).manual_seed(seed), steps)
    exact = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_scatter, torch.Generator().manual_seed(seed))
    cols = 2 + 2 * n_samples + 1
    fig, axes = plt.subplots(n_contexts, cols, figsize=(1.35 * cols, 1.5 * n_contexts))
    for i in range(n_contexts):
        shown = batch["ctxt_obs"][i, 0] - 0.6 * (1 - batch["ctxt_params"][i, 0])  # hidden half drawn dark
        row = [(shown, "input"), (batch["novel_obs"][i], "truth")]
        row += [(generate(samples[i, :n_samples])[j], model.kind) for j in range(n_samples)]
        row += [(generate(exact[i, :n_samples])[j], "exact") for j in range(n_samples)]
        for ax, (image, title) in zip(axes[i], row):
            ax.imshow(to_rgb(image))
            ax.set_title(title if i == 0 else "", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        hidden = hidden_latents(batch["ctxt_params"][i, 0:1])[0]  # (D,)
        a, b = torch.nonzero(hidden)[:2, 0].tolist()  # two of the hidden latents
        ax = axes[i, -1]
        ax.scatter(exact[i, :, a].cpu(), exact[i, :, b].cpu(), s=4, color="tab:blue", label="exact")
        ax.scatter(samples[i, :, a].cpu(), samples[i, :, b].cpu(), s=4, color="tab:red", label=model.kind)
        ax.set_xlim(-2, 2), ax.set_ylim(-2, 2), ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"hidden z{a}, z{b}" if i == 0 else "", fontsize=8)
    fig.suptitle(f"GAN inversion, {model.kind}: completions of a half-visible image, and two hidden latents",
                 fontsize=9)
    fig.tight_layout()
    toy_problems.save_figure(fig, path)
