"""1D toy: signals from a mixture of Gaussian processes, observed through windows.

The signal is a function on a grid of N = 32 points, drawn from one of two Gaussian
processes with the same kernel, one around +0.5 and one around -0.5. The forward model reads
the signal in a window of W = 8 points; its params are the window's start index. A
context is one or more windows, a target another window.

A short window often cannot tell the two processes apart (for about half of all
single-window contexts the likelier one has a posterior weight below 0.9; a test checks it),
so the posterior over the rest of the signal is *bimodal*. Because everything is Gaussian given the component, the
posterior is a Gaussian mixture in closed form (Rasmussen & Williams, eq. 2.19, with the
mixture weights from the marginal likelihood of the observed points). A deterministic model
can only draw the weighted mean of the two branches; DFM should draw from both.
"""
import math

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import dfm
import toy_problems

N = 32  # grid points in a signal
W = 8  # points in a window (one observation)
GRID = torch.linspace(0, 1, N, dtype=torch.float64)
# The prior: (mixture weight, mean level, lengthscale, amplitude) of each GP component.
COMPONENTS = [(0.5, +0.5, 0.2, 0.6), (0.5, -0.5, 0.2, 0.6)]
JITTER = 1e-4  # white noise added to each covariance; part of the prior, so the posterior stays exact
TILES = [0, 8, 16, 24]  # window starts that cover the signal, for whole-signal sampling
SIGNAL_SHAPE = (N,)
SIGMA_DATA = 0.8  # standard deviation of a signal value under the prior
LOW_NOISE_CAP = 20  # the t below which training draws t no more often than at this one (Denoiser.timestep_weights)

# The novel window's term weighs a quarter: most of its loss is the wide posterior of a window the context says
# little about, and at full weight its gradient buries the target window's (RESULTS.md, gp1d). Any weight > 0
# leaves the optimum of the loss at the posterior.
TRAIN_DEFAULTS = dict(steps=15000, batch_size=256, lr=1e-3, novel_weight=0.25)


def component_mean_cov(k):
    """Mean (N,) and covariance (N, N) of component k, in float64."""
    _, level, lengthscale, amplitude = COMPONENTS[k]
    sqdist = (GRID[:, None] - GRID[None, :]) ** 2
    cov = amplitude ** 2 * torch.exp(-sqdist / (2 * lengthscale ** 2)) + JITTER * torch.eye(N, dtype=torch.float64)
    return torch.full((N,), level, dtype=torch.float64), cov


# -----------------------------------------------------------------------------
# Data and forward model


def forward(signal, params):
    """Read the signal in a window: signal (B, N), params (B, 1) start index -> obs (B, W)."""
    if signal.dim() != 2 or signal.shape[1] != N:
        raise ValueError(f"signal must be (B, {N}), got {tuple(signal.shape)}")
    index = params[:, :1].long() + torch.arange(W, device=signal.device)  # (B, W)
    return signal.gather(1, index)


def sample_prior(batch_size, generator):
    """Draw signals from the prior: (B, N)."""
    weights = torch.tensor([c[0] for c in COMPONENTS])
    which = torch.multinomial(weights, batch_size, replacement=True, generator=generator)  # (B,)
    z = torch.randn(batch_size, N, generator=generator, dtype=torch.float64)
    signals = torch.empty(batch_size, N, dtype=torch.float64)
    for k in range(len(COMPONENTS)):
        mean, cov = component_mean_cov(k)
        chol = torch.linalg.cholesky(cov)
        signals[which == k] = mean + z[which == k] @ chol.T
    return signals.float()


def random_starts(*shape, generator):
    return torch.randint(0, N - W + 1, shape, generator=generator).float().unsqueeze(-1)  # (*shape, 1)


def sample_batch(batch_size, generator, device="cpu", n_ctxt=None):
    """A batch of training examples; Nc is drawn from 1..4 (the contexts of whole-signal sampling) unless given."""
    if n_ctxt is None:
        n_ctxt = int(torch.randint(1, 5, (), generator=generator))
    signal = sample_prior(batch_size, generator)  # (B, N)
    ctxt_params = random_starts(batch_size, n_ctxt, generator=generator)  # (B, Nc, 1)
    trgt_params = random_starts(batch_size, generator=generator)  # (B, 1)
    novel_params = random_starts(batch_size, generator=generator)  # (B, 1)
    ctxt_obs = torch.stack([forward(signal, ctxt_params[:, i]) for i in range(n_ctxt)], dim=1)  # (B, Nc, W)
    batch = dict(ctxt_obs=ctxt_obs, ctxt_params=ctxt_params,
                 trgt_obs=forward(signal, trgt_params), trgt_params=trgt_params,
                 novel_obs=forward(signal, novel_params), novel_params=novel_params, signal=signal)
    return {k: v.to(device) for k, v in batch.items()}


def sample_views(n_signals, n_views, generator):
    """A fixed data set (train.py --signals/--views): signals from the prior, each seen through
    n_views random windows -> dict(signal (S, N), obs (S, V, W), params (S, V, 1))."""
    signal = sample_prior(n_signals, generator)  # (S, N)
    params = random_starts(n_signals, n_views, generator=generator)  # (S, V, 1)
    obs = torch.stack([forward(signal, params[:, v]) for v in range(n_views)], dim=1)  # (S, V, W)
    return dict(signal=signal, obs=obs, params=params)


def finite_batch(views, batch_size, generator, device="cpu"):
    """A batch from a fixed data set: as sample_batch, 1..4 context windows, but at most V - 1 of them."""
    n_ctxt = int(torch.randint(1, min(4, views["obs"].shape[1] - 1) + 1, (), generator=generator))
    return toy_problems.finite_batch(views, batch_size, generator, n_ctxt, device=device)


def held_out_batch(n_contexts, seed=0, device="cpu"):
    """Fixed evaluation contexts (one window each), from a seed stream that training never uses."""
    return sample_batch(n_contexts, toy_problems.held_out_generator(seed), device, n_ctxt=1)


FORWARD_ERRORS = ("shift", "blur")


def forward_with_error(kind, size):
    """A forward model that differs from the data's `forward` (study 2 of experiments/study.py):

    shift: reads every window `size` points to the right (an integer >= 0; clamped at the end);
    blur:  reads the signal blurred by a Gaussian of standard deviation `size` grid points (> 0).
    """
    if kind == "shift":
        if size != int(size) or size < 0:
            raise ValueError(f"--forward-error-size for shift must be a whole number of points >= 0, got {size}")
        return lambda signal, params: forward(signal, (params + int(size)).clamp(max=N - W))
    if kind == "blur":
        if not size > 0:
            raise ValueError(f"--forward-error-size for blur must be a standard deviation > 0, got {size}")
        radius = math.ceil(3 * size)
        kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / size) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)  # (1, 1, 2r + 1)

        def blurred(signal, params):
            padded = F.pad(signal.unsqueeze(1), (radius, radius), mode="replicate")  # (B, 1, N + 2r)
            return forward(F.conv1d(padded, kernel.to(signal)).squeeze(1), params)
        return blurred
    raise ValueError(f"unknown forward error {kind!r} for gp1d: expected one of {', '.join(FORWARD_ERRORS)}")


# -----------------------------------------------------------------------------
# The default denoiser


def to_canvas(obs, params):
    """Place windows on the full grid: obs (B, Nc, W), params (B, Nc, 1) -> values (B, N), mask (B, N).

    Overlapping windows are averaged, so any number of contexts gives the same two channels.
    """
    B, Nc, _ = obs.shape
    index = (params[..., :1].long() + torch.arange(W, device=obs.device)).view(B, Nc * W)  # (B, Nc*W)
    values = torch.zeros(B, N, device=obs.device).scatter_add(1, index, obs.reshape(B, Nc * W))
    count = torch.zeros(B, N, device=obs.device).scatter_add(1, index, torch.ones_like(values[:, :1]).expand(B, Nc * W))
    return values / count.clamp(min=1), (count > 0).float()


class ConvBlock(nn.Module):
    """Residual block of two dilated convolutions, modulated by the timestep (FiLM) and by a
    summary of the whole signal (its mean feature), which lets far-apart points agree on
    which mixture component they belong to."""

    def __init__(self, channels, dilation, time_width):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.film = nn.Linear(time_width, 2 * channels)
        self.summary = nn.Linear(channels, channels)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)

    def forward(self, h, temb):  # h (B, C, N), temb (B, time_width)
        scale, shift = self.film(temb).unsqueeze(-1).chunk(2, dim=1)  # (B, C, 1) each
        y = self.norm(h) * (1 + scale) + shift + self.summary(h.mean(-1)).unsqueeze(-1)
        return h + self.conv2(F.silu(self.conv1(F.silu(y))))


class Denoiser(nn.Module):
    """A 1D convolutional net over [context canvas, context mask, noisy-target canvas, target mask].

    Convolutions suit the problem: the prior is stationary, so what the net learns about a
    window at one position holds at every position (an MLP over the canvas learned the same
    thing position by position, several times slower). Dilations 1..16 span the grid.
    For the oracle the 'noisy target' is the noisy signal itself (all N points), so its mask is all ones.
    The output is preconditioned as in Karras et al. 2022 (eq. 7): observed points are copied from
    the context, and elsewhere the network adds a correction of the right size to the best linear
    guess of the signal from the noisy target, so that it need not learn to copy its input. DFM's
    noisy target covers only the target window; off it x_t says nothing, so there the guess is 0 and
    the correction has the prior's size at every t. (Scaled as in the window, the network would have
    to output values a hundred times the signal's at low noise to explain the novel view.)
    """

    def __init__(self, oracle=False, channels=32, dilations=(1, 2, 4, 8, 16)):
        super().__init__()
        self.oracle = oracle
        self.inp = nn.Conv1d(4, channels, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 128))
        self.blocks = nn.ModuleList([ConvBlock(channels, d, 128) for d in dilations])
        self.out = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv1d(channels, 1, 3, padding=1))
        self.register_buffer("abar", None, persistent=False)  # the noise schedule of the model it belongs to

    def use_schedule(self, abar):
        """Called by dfm.DFM: precondition with the model's own noise levels (any T, any schedule)."""
        self.abar = abar.clone()  # a buffer: moves with .to(device)

    def timestep_weights(self, abar):
        """Called by dfm.DFM: how often training draws each t, (T,). The loss at t is scale(t)^2 times the
        network's own error, so with t uniform the low-noise steps, where scale is small, teach the network
        almost nothing, and DFM's x0 came out noisiest there (experiments/diagnose.py). Half of the t are drawn
        in proportion to 1 / scale(t)^2, which gives every t's network output targets of unit variance (capped
        at t = LOW_NOISE_CAP, where scale goes to 0), half uniformly. Every t keeps a positive probability, so
        the optimum at each t is still E[x0 | x_t, context]: only where the capacity goes changes."""
        w = precondition(abar)[1].pow(-2)  # (T,)
        w = w.clamp(max=w[LOW_NOISE_CAP])
        return 0.5 / len(w) + 0.5 * w / w.sum()

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        ctxt_values, ctxt_mask = to_canvas(ctxt_obs, ctxt_params)  # (B, N), (B, N)
        if self.oracle:
            trgt_values, trgt_mask = noisy_trgt, torch.ones_like(noisy_trgt)  # (B, N)
        else:
            trgt_values, trgt_mask = to_canvas(noisy_trgt.unsqueeze(1), trgt_params.unsqueeze(1))  # (B, N)
        h = self.inp(torch.stack([ctxt_values, ctxt_mask, trgt_values, trgt_mask], dim=1))  # (B, C, N)
        temb = self.time(dfm.timestep_embedding(t))  # (B, 128)
        for block in self.blocks:
            h = block(h, temb)
        # Precondition each point by what the noisy target says of it: in the target window, as at noise level
        # abar_t; elsewhere x_t says nothing, as at abar = 0 (no skip, a residual of the prior's size).
        abar = torch.where(trgt_mask > 0, self.abar[t].unsqueeze(1), 0.0)  # (B, N)
        skip, scale = precondition(abar)  # (B, N) each
        guess = torch.where(ctxt_mask > 0, ctxt_values, skip * trgt_values)  # (B, N)
        return guess + (1 - ctxt_mask) * scale * self.out(h)[:, 0]  # (B, N)


def precondition(abar):
    """(skip, scale) at noise levels abar: for x0 with variance SIGMA_DATA^2, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    gives E[x0 | x_t] = skip * x_t and a residual of standard deviation scale."""
    s2 = SIGMA_DATA ** 2
    skip = abar.sqrt() * s2 / (abar * s2 + 1 - abar)
    scale = (s2 * (1 - abar) / (abar * s2 + 1 - abar)).sqrt()
    return skip, scale


def make_denoiser(kind):
    return Denoiser(oracle=(kind == "oracle"))


# -----------------------------------------------------------------------------
# The exact posterior


def exact_posterior_mixture(ctxt_obs, ctxt_params):
    """The posterior of one signal given its context windows, in closed form.

    ctxt_obs (Nc, W), ctxt_params (Nc, 1). Returns a list, one entry per component, of
    (weight, mean (N,), cov (N, N)), float64; observed points have their value and zero variance.
    """
    observed = torch.zeros(N, dtype=torch.bool)
    y = torch.zeros(N, dtype=torch.float64)
    for obs, start in zip(ctxt_obs, ctxt_params[:, 0].long().tolist()):
        observed[start:start + W] = True
        y[start:start + W] = obs.double().cpu()
    o, u = observed, ~observed
    log_weights, parts = [], []
    for k, (prior_weight, *_) in enumerate(COMPONENTS):
        mean, cov = component_mean_cov(k)
        chol = torch.linalg.cholesky(cov[o][:, o])
        resid = (y[o] - mean[o]).unsqueeze(1)  # (No, 1)
        alpha = torch.cholesky_solve(resid, chol)  # K_oo^-1 (y_o - m_o)
        # log N(y_o; m_o, K_oo): how well component k explains the context
        log_lik = -0.5 * (resid * alpha).sum() - chol.diagonal().log().sum() - 0.5 * o.sum() * math.log(2 * math.pi)
        log_weights.append(math.log(prior_weight) + log_lik)
        post_mean, post_cov = y.clone(), torch.zeros(N, N, dtype=torch.float64)
        post_mean[u] = mean[u] + cov[u][:, o] @ alpha[:, 0]  # m_u + K_uo K_oo^-1 (y_o - m_o)
        post_cov[torch.outer(u, u)] = (cov[u][:, u] - cov[u][:, o] @ torch.cholesky_solve(cov[o][:, u], chol)).flatten()
        parts.append((post_mean, post_cov))
    weights = torch.softmax(torch.stack(log_weights), dim=0)
    return [(float(w), m, c) for w, (m, c) in zip(weights, parts)]


def exact_posterior(ctxt_obs, ctxt_params, n_samples, generator):
    """Exact samples of p(signal | context): ctxt_obs (B, Nc, W), ctxt_params (B, Nc, 1) -> (B, n, N)."""
    samples = []
    for obs, params in zip(ctxt_obs, ctxt_params):
        mixture = exact_posterior_mixture(obs, params)
        weights = torch.tensor([w for w, _, _ in mixture])
        which = torch.multinomial(weights, n_samples, replacement=True, generator=generator)
        z = torch.randn(n_samples, N, generator=generator, dtype=torch.float64)
        out = torch.empty(n_samples, N, dtype=torch.float64)
        for k, (_, mean, cov) in enumerate(mixture):
            unobserved = cov.diagonal() > 0
            chol = torch.linalg.cholesky(cov[unobserved][:, unobserved])
            draws = mean.repeat(n_samples, 1)
            draws[:, unobserved] += z[:, unobserved] @ chol.T
            out[which == k] = draws[which == k]
        samples.append(out)
    return torch.stack(samples).float().to(ctxt_obs.device)


def exact_denoiser(ctxt_obs, ctxt_params, trgt_params=None):
    """The Bayes-optimal denoiser in closed form, x0(x_t, abar) = E[O | x_t, context], for O the target window
    (trgt_params (B, 1)) or, without trgt_params, the whole signal; x_t (B, W) or (B, N), abar (B,).

    Given the context, O is a mixture of two Gaussians N(m_k, C_k) with weights w_k (exact_posterior_mixture),
    so given x_t = a O + s eps (a = sqrt(abar), s^2 = 1 - abar) as well it is one too: component k has weight
    proportional to w_k N(x_t; a m_k, a^2 C_k + s^2 I) and mean m_k + a C_k (a^2 C_k + s^2 I)^-1 (x_t - a m_k).
    """
    B = ctxt_obs.shape[0]
    weights, means, covs = [], [], []
    for b in range(B):
        part = slice(int(trgt_params[b, 0]), int(trgt_params[b, 0]) + W) if trgt_params is not None else slice(0, N)
        mixture = exact_posterior_mixture(ctxt_obs[b], ctxt_params[b])
        weights.append(torch.tensor([w for w, _, _ in mixture], dtype=torch.float64))
        means.append(torch.stack([m[part] for _, m, _ in mixture]))
        covs.append(torch.stack([c[part, part] for _, _, c in mixture]))
    log_w, m, C = torch.stack(weights).clamp(min=1e-300).log(), torch.stack(means), torch.stack(covs)  # (B, K, D..)
    eye = torch.eye(m.shape[-1], dtype=torch.float64)

    def x0(x_t, abar):
        a = abar.double().cpu().sqrt().view(B, 1, 1, 1)
        chol = torch.linalg.cholesky(a ** 2 * C + (1 - a ** 2) * eye)  # (B, K, D, D)
        resid = x_t.double().cpu()[:, None, :, None] - a * m[..., None]  # (B, K, D, 1)
        alpha = torch.cholesky_solve(resid, chol)  # (a^2 C + s^2 I)^-1 (x_t - a m)
        log_lik = -0.5 * (resid * alpha).sum((-2, -1)) - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (B, K)
        p = torch.softmax(log_w + log_lik, dim=1)  # p(k | x_t, context)
        mean_k = m + a[..., 0] * (C @ alpha)[..., 0]  # (B, K, D)
        return (p[..., None] * mean_k).sum(1).to(x_t)

    return x0


# -----------------------------------------------------------------------------
# Scores and pictures


def draw_samples(model, batch, n_samples, generator, steps=50):
    """Model samples for each context: (target-window signals (B, n, N), whole signals (B, n, N)).

    DFM and the deterministic model sample the target window, then cover the whole signal
    autoregressively, tile by tile; the oracle samples the whole signal at once.
    """
    model.eval()
    ctxt_obs, ctxt_params = batch["ctxt_obs"], batch["ctxt_params"]
    B = ctxt_obs.shape[0]
    window = dfm.sample_signals(model, batch, n_samples, generator, steps)
    if model.kind == "oracle":
        return window, window
    tiles = [torch.full((B * n_samples, 1), float(s), device=ctxt_obs.device) for s in TILES]
    whole, _ = model.sample_autoregressive(dfm.repeat_batch(ctxt_obs, n_samples),
                                           dfm.repeat_batch(ctxt_params, n_samples), tiles, steps=steps,
                                           generator=generator)
    return window, whole.view(B, n_samples, N)


@torch.no_grad()
def oracle_by_window(model, batch, n_samples, generator, steps=50):
    """The oracle's whole signals drawn as DFM must draw them: window by window (TILES), each from a
    fresh whole-signal sample given the context and the windows kept so far -> (B, n, N).

    Scoring these beside the oracle's one-go samples splits DFM's whole-signal gap into what
    sampling window by window costs any model and what DFM's own windows cost."""
    ctxt_obs, ctxt_params = (dfm.repeat_batch(batch[k], n_samples) for k in ("ctxt_obs", "ctxt_params"))
    for start in TILES:
        tile = torch.full((ctxt_obs.shape[0], 1), float(start), device=ctxt_obs.device)  # (B * n, 1)
        signal, _ = model.sample(ctxt_obs, ctxt_params, tile, steps=steps, generator=generator,
                                 obs_shape=(N,))  # (B * n, N)
        ctxt_obs = torch.cat([ctxt_obs, forward(signal, tile).unsqueeze(1)], dim=1)  # (B * n, Nc + 1, W)
        ctxt_params = torch.cat([ctxt_params, tile.unsqueeze(1)], dim=1)  # (B * n, Nc + 1, 1)
    return signal.view(batch["ctxt_obs"].shape[0], n_samples, N)


def evaluate(model, seed=0, n_contexts=64, n_samples=64, steps=50):
    """Energy distance to the exact posterior on the target window and on the whole signal, with floors;
    for the oracle also on the whole signal drawn window by window (signal_by_window), as DFM draws it."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    window, whole = draw_samples(model, batch, n_samples, generator, steps)
    by_window = oracle_by_window(model, batch, n_samples, generator, steps) if model.kind == "oracle" else None
    cpu = torch.Generator().manual_seed(seed)
    exact_a = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, cpu)
    exact_b = exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], n_samples, cpu)

    def read_window(s):  # (B, n, N) -> (B, n, W) at each context's target window
        params = dfm.repeat_batch(batch["trgt_params"], n_samples)
        return forward(s.flatten(0, 1), params).view(n_contexts, n_samples, W)

    scores = {
        "window": dfm.energy_distance(read_window(window), read_window(exact_a)).mean().item(),
        "window_floor": dfm.energy_distance(read_window(exact_b), read_window(exact_a)).mean().item(),
        "signal": dfm.energy_distance(whole, exact_a).mean().item(),
        "signal_floor": dfm.energy_distance(exact_b, exact_a).mean().item(),
    }
    if by_window is not None:
        scores["signal_by_window"] = dfm.energy_distance(by_window, exact_a).mean().item()
    return scores


def plot(model, path, seed=0, n_contexts=3, n_samples=12, steps=50):
    """Whole-signal samples over the exact posterior's bands (mean +- 2 sd of each mixture component)."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    _, whole = draw_samples(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps)
    x = GRID.numpy()
    fig, axes = plt.subplots(1, n_contexts, figsize=(4.5 * n_contexts, 3.2), sharey=True)
    for i, ax in enumerate(axes):
        for weight, mean, cov in exact_posterior_mixture(batch["ctxt_obs"][i].cpu(), batch["ctxt_params"][i].cpu()):
            sd = cov.diagonal().sqrt()
            ax.fill_between(x, mean - 2 * sd, mean + 2 * sd, color="tab:blue", alpha=0.1 + 0.4 * weight, lw=0)
        for s in whole[i].cpu():
            ax.plot(x, s, color="tab:red", lw=0.8, alpha=0.7)
        start = int(batch["ctxt_params"][i, 0, 0])
        ax.plot(x[start:start + W], batch["ctxt_obs"][i, 0].cpu(), color="black", lw=3, label="context")
        ax.set_xlabel("position")
    axes[0].plot([], [], color="tab:red", label=f"{model.kind} samples")
    axes[0].fill_between([], [], [], color="tab:blue", alpha=0.4, label="exact posterior (2 sd)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"1D mixture of GPs: {model.kind} samples of the whole signal given one window")
    fig.tight_layout()
    toy_problems.save_figure(fig, path)
