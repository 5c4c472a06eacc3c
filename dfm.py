"""Diffusion with Forward Models (Tewari et al., NeurIPS 2023), generic over forward models.

The signal S (a scene, a motion field, a latent) is never observed. We only see
observations O = forward_model(S, params). DFM runs an ordinary diffusion process in the
space of *target observations*, but its denoiser predicts the *signal*, and the forward
model turns that prediction into the denoised observation:

    x_t   = sqrt(abar_t) * O_trgt + sqrt(1 - abar_t) * eps              (noise the target)
    S_hat = denoiser(O_ctxt, params_ctxt, x_t, params_trgt, t)           (predict the signal)
    O_hat = forward_model(S_hat, params_trgt)                            (the x0 estimate)
    loss  = |O_hat - O_trgt|^2  (+ novel_weight x the same on a novel view of S_hat)

Every denoised observation is therefore the rendering of one signal, and the last S_hat of
a sampling run is a sample of p(S | O_ctxt).

This file holds the noise schedule, the DFM module (its loss and the DDIM/DDPM samplers),
the two comparison models (deterministic and oracle), n samples per context, the building
blocks that the toy denoisers share, and the distance that scores sample sets against an
exact posterior; the small helpers and argument checks are at the bottom.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Noise schedule


def schedule(timesteps=1000, kind="cosine"):
    """Named tensors of the forward (noising) process, indexed by t in [0, T).

    abar[t] = prod_{i <= t} (1 - betas[i]) is the fraction of signal variance left at step t.
    """
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17, with s = 0.008 as in the authors' code
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    elif kind == "linear":  # Ho et al. 2020
        betas = torch.linspace(1e-4 * 1000 / timesteps, 0.02 * 1000 / timesteps, timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown schedule {kind!r}: expected 'cosine' or 'linear'")
    abar = torch.cumprod(1 - betas, dim=0)
    return {"betas": betas.float(), "abar": abar.float()}


# -----------------------------------------------------------------------------
# The method


class DFM(nn.Module):
    """Diffusion with Forward Models: a conditional diffusion model over target observations whose
    denoiser predicts the signal; `loss` is the objective of the module docstring, `sample` its sampler.

    denoiser(ctxt_obs, ctxt_params, x_t, trgt_params, t) -> signal   an nn.Module, the model's only weights
    forward_model(signal, params) -> obs     any differentiable callable (a problem's `forward`)
    obs_loss(pred, target) -> scalar         the |O_hat - O_trgt|^2 of the loss (default: mean squared error;
                                             the 3D problem adds LPIPS)
    ctxt_drop_prob: the probability of hiding the context during training, which teaches the
        unconditional model that classifier-free guidance needs (0.1 in the authors' code).
    novel_weight: the weight of the novel-view term (1 in the paper). Where the two views overlap both terms
        ask for the same values, and elsewhere only the novel term speaks, so a weight > 0 leaves the optimum
        where it was; a smaller one lets the target's term, the one the sampler uses, weigh more in the
        gradient (gp1d, RESULTS.md).

    Shapes: ctxt_obs (B, Nc, *obs_shape), ctxt_params (B, Nc, *param_shape), trgt_obs (B, *obs_shape),
    trgt_params (B, *param_shape), t (B,); params are a tensor or a dict of tensors (cameras).

    Hooks, for a problem that needs more, without DFM knowing the problem:
    - loss(..., pixels=(B, P), novel_pixels=(B, P')) takes the loss on those pixels only (the paper renders
      one random patch per view, to save memory); it calls forward_model(signal, params, pixels=pixels),
      which must render just those pixels and return (obs (B, C, P), extras): extras is what else the
      render made there (the 3D model's depth) or None. The denoiser still sees the whole noisy target.
    - A denoiser with a method aux_loss(signal, trgt_obs, trgt_params, pixels, extras) -> scalar adds its own
      terms, given the target's pixels and extras (the 3D model's conditioning render and depth smoothness).
    - A denoiser with a method use_schedule(abar) is handed the model's noise schedule (gp1d's
      preconditions by the noise level), so that the two never disagree.
    - A denoiser with a method timestep_weights(abar) -> (T,) positive weights says how often training draws each
      t (gp1d's: more of the low-noise steps); without it t is uniform. Any weights that are positive at every t
      leave the optimum, E[O_trgt | x_t, context] at each t, where it was.
    """

    kind = "dfm"  # what this model is: "dfm", "deterministic" or "oracle"
    # The batch entries that model(batch) hands to loss, in its argument order (the oracle's differ).
    loss_inputs = ("ctxt_obs", "ctxt_params", "trgt_obs", "trgt_params", "novel_obs", "novel_params",
                   "pixels", "novel_pixels")

    def __init__(self, denoiser, forward_model, timesteps=1000, schedule_kind="cosine", ctxt_drop_prob=0.0,
                 obs_loss=None, novel_weight=1.0):
        super().__init__()
        if not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
        if not 0 <= ctxt_drop_prob < 1:
            raise ValueError(f"ctxt_drop_prob must be in [0, 1), got {ctxt_drop_prob}")
        if not novel_weight >= 0:
            raise ValueError(f"novel_weight must be >= 0, got {novel_weight}")
        self.denoiser = denoiser
        self.forward_model = forward_model
        self.timesteps = timesteps
        self.ctxt_drop_prob = ctxt_drop_prob
        self.novel_weight = novel_weight
        self.obs_loss = obs_loss or F.mse_loss
        for name, value in schedule(timesteps, schedule_kind).items():
            self.register_buffer(name, value, persistent=False)
        if hasattr(denoiser, "use_schedule"):
            denoiser.use_schedule(self.abar)
        t_probs = None  # None: t ~ Uniform{0, ..., T-1}
        if hasattr(denoiser, "timestep_weights"):
            weights = denoiser.timestep_weights(self.abar)
            if weights.shape != (timesteps,) or not (weights > 0).all():
                raise ValueError(f"timestep_weights must be {timesteps} positive weights, got shape "
                                 f"{tuple(weights.shape)} with minimum {weights.min().item():.3g}")
            t_probs = weights / weights.sum()
        self.register_buffer("t_probs", t_probs, persistent=False)

    def forward(self, batch):
        """model(batch) is the training loss of a batch (a dict with sample_batch's keys). Training calls the
        model rather than .loss because DistributedDataParallel syncs gradients only through the module's call."""
        missing = [key for key in self.loss_inputs[:4] if key not in batch]
        if missing:
            raise ValueError(f"the {self.kind} model trains on {', '.join(self.loss_inputs[:4])}; "
                             f"the batch has no {', '.join(missing)}")
        return self.loss(*(batch.get(key) for key in self.loss_inputs))

    def loss(self, ctxt_obs, ctxt_params, trgt_obs, trgt_params, novel_obs=None, novel_params=None,
             pixels=None, novel_pixels=None):
        """The DFM objective, the four lines of the module docstring; pixels (B, P) and novel_pixels (B, P')
        restrict it, and the rendering it needs, to those pixels of the target and of the novel view."""
        _check_context(ctxt_obs, ctxt_params, trgt_params)
        x_t, t = self.noisy_target(trgt_obs)  # x_t = sqrt(abar_t) * O_trgt + sqrt(1 - abar_t) * eps
        if self.ctxt_drop_prob > 0:  # classifier-free guidance: hide the context of some examples
            keep = torch.rand(len(ctxt_obs), device=ctxt_obs.device) >= self.ctxt_drop_prob  # (B,)
            ctxt_obs = ctxt_obs * keep.view(-1, *[1] * (ctxt_obs.dim() - 1))
        S_hat = self.denoiser(ctxt_obs, ctxt_params, x_t, trgt_params, t)  # predict the signal
        O_hat, extras = self.render(S_hat, trgt_params, trgt_obs, pixels)  # O_hat = forward_model(S_hat)
        loss = self.obs_loss(O_hat, select_pixels(trgt_obs, pixels))  # loss = |O_hat - O_trgt|^2
        if novel_obs is not None and self.novel_weight > 0:  # S_hat must also explain a view it was not given:
            O_novel, _ = self.render(S_hat, novel_params, novel_obs, novel_pixels)
            loss = loss + self.novel_weight * self.obs_loss(O_novel, select_pixels(novel_obs, novel_pixels))
        if hasattr(self.denoiser, "aux_loss"):  # hook: the denoiser's own terms
            loss = loss + self.denoiser.aux_loss(S_hat, trgt_obs, trgt_params, pixels, extras)
        return loss

    def noisy_target(self, trgt_obs):
        """The denoiser's input in training: (x_t, t), x_t ~ q(x_t | O_trgt) at t ~ Uniform{0, ..., T-1}, or at t
        drawn by the denoiser's timestep_weights."""
        B = trgt_obs.shape[0]
        if self.t_probs is None:
            t = torch.randint(0, self.timesteps, (B,), device=trgt_obs.device)  # t ~ Uniform{0, ..., T-1}
        else:
            t = torch.multinomial(self.t_probs, B, replacement=True)  # t ~ t_probs
        eps = torch.randn_like(trgt_obs)  # eps ~ N(0, I)
        abar = self.abar[t].view(B, *[1] * (trgt_obs.dim() - 1))
        return abar.sqrt() * trgt_obs + (1 - abar).sqrt() * eps, t

    def render(self, signal, params, like, pixels=None):
        """(obs, extras): forward_model(signal, params), checked against the observation `like` that it must match,
        and None; with pixels (B, P), indices into the flattened image, forward_model(signal, params, pixels=pixels):
        only those pixels, (B, C, P) as select_pixels(like, pixels), and what else the render made there."""
        if pixels is None:
            obs, extras = self.forward_model(signal, params), None
        else:
            obs, extras = self.forward_model(signal, params, pixels=pixels)
        _check_rendered(obs, like, pixels)
        return obs, extras

    def denoise(self, ctxt_obs, ctxt_params, x_t, trgt_params, t):
        """(S_hat, O_hat) at x_t: the predicted signal and its rendering, the x0 estimate that sampling steps to."""
        _check_timestep(t, x_t.shape[0], self.timesteps)
        signal = self.denoiser(ctxt_obs, ctxt_params, x_t, trgt_params, t)
        return signal, self.render(signal, trgt_params, x_t)[0]

    @torch.no_grad()
    def sample(self, ctxt_obs, ctxt_params, trgt_params, steps=50, sampler="ddim", eta=0.0,
               temperature=1.0, guidance=1.0, generator=None, obs_shape=None):
        """Sample a signal given the context; returns (signal, obs) with obs = forward_model(signal, trgt_params).

        sampler: "ddim" (eta = 0 is deterministic given x_T) or "ddpm" (ancestral), each over
            `steps` evenly spaced timesteps.
        temperature: scales the initial noise x_T (0.85 in the authors' code).
        guidance: classifier-free guidance scale on the x0 estimate (1 = off; the model must
            have been trained with ctxt_drop_prob > 0).
        generator: an int seed or a torch.Generator, for reproducible samples.
        obs_shape: shape of one target observation; defaults to that of the context observations.
        """
        _check_context(ctxt_obs, ctxt_params, trgt_params)
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}: expected 'ddim' or 'ddpm'")
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        generator = _make_generator(generator, ctxt_obs.device)
        step = ddim_step if sampler == "ddim" else ddpm_step
        B, device = ctxt_obs.shape[0], ctxt_obs.device
        abar = torch.cat([self.abar, self.abar.new_ones(1)])  # abar[-1] = 1: no noise left after the last step
        ts = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()  # T-1 first, 0 last
        shape = (B, *(obs_shape or ctxt_obs.shape[2:]))  # (B, *obs_shape)
        x = temperature * torch.randn(shape, generator=generator, device=device)  # x_T ~ N(0, temperature^2 I)
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            t_batch = torch.full((B,), t, device=device, dtype=torch.long)
            signal, x0 = self.denoise(ctxt_obs, ctxt_params, x, trgt_params, t_batch)  # x0 = forward_model(S_hat)
            if guidance != 1.0:  # x0 = x0_uncond + w * (x0_cond - x0_uncond)
                _, x0_uncond = self.denoise(torch.zeros_like(ctxt_obs), ctxt_params, x, trgt_params, t_batch)
                x0 = x0_uncond + guidance * (x0 - x0_uncond)
            x = step(x, x0, abar[t], abar[t_prev], eta, generator)
        return signal, self.forward_model(signal, trgt_params)

    @torch.no_grad()
    def sample_autoregressive(self, ctxt_obs, ctxt_params, trgt_params_seq, **sample_kwargs):
        """Sample targets one after another, appending each sampled observation to the context.

        trgt_params_seq: a list of K target params, each (B, *param_shape).
        Returns the signal of the last step (conditioned on the context and all K sampled
        observations) and the K sampled observations, (B, K, *obs_shape).
        """
        sampled = []
        for trgt_params in trgt_params_seq:
            signal, obs = self.sample(ctxt_obs, ctxt_params, trgt_params, **sample_kwargs)
            sampled.append(obs)
            ctxt_obs = torch.cat([ctxt_obs, obs.unsqueeze(1)], dim=1)  # (B, Nc + 1, *obs_shape)
            ctxt_params = _cat_params(ctxt_params, _map_params(lambda p: p.unsqueeze(1), trgt_params))
        return signal, torch.stack(sampled, dim=1)


def ddim_step(x, x0, abar, abar_prev, eta, generator):
    """DDIM update x_t -> x_{t_prev} towards the x0 estimate (Song et al. 2021, eq. 12)."""
    eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise implied by x0
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    noise = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 else 0.0
    return abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise


def ddpm_step(x, x0, abar, abar_prev, eta, generator):
    """Ancestral step: draw x_{t_prev} ~ q(x_{t_prev} | x_t, x0) (Ho et al. 2020, eqs. 6-7). eta is unused."""
    alpha = abar / abar_prev  # 1 - beta over the (possibly respaced) step
    mean = (abar_prev.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - abar_prev) * x) / (1 - abar)
    var = (1 - abar_prev) / (1 - abar) * (1 - alpha)
    return mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device)


# -----------------------------------------------------------------------------
# The two comparison models


class Deterministic(DFM):
    """The same denoiser and forward model without diffusion (pixelNeRF-style regression).

    The denoiser gets an all-zero 'noisy target' at t = T-1, so it must predict the target
    from the context alone; with an L2 loss it learns the conditional mean, which is blurry
    wherever the context leaves the signal uncertain. Its loss is DFM's with that input.
    """

    kind = "deterministic"

    def noisy_target(self, trgt_obs):
        """No noise to remove: an all-zero target at t = T-1."""
        t = torch.full((trgt_obs.shape[0],), self.timesteps - 1, device=trgt_obs.device, dtype=torch.long)
        return torch.zeros_like(trgt_obs), t

    @torch.no_grad()
    def sample(self, ctxt_obs, ctxt_params, trgt_params, obs_shape=None, **ignored):
        """The one prediction the model can make; sampler options are accepted and ignored."""
        _check_context(ctxt_obs, ctxt_params, trgt_params)
        like = torch.zeros(ctxt_obs.shape[0], *(obs_shape or ctxt_obs.shape[2:]), device=ctxt_obs.device)
        x_t, t = self.noisy_target(like)
        return self.denoise(ctxt_obs, ctxt_params, x_t, trgt_params, t)


def identity(signal, params):
    """The oracle's forward model: it observes the signal itself."""
    return signal


class Oracle(DFM):
    """Plain conditional diffusion trained on the ground-truth signals, which only a toy can provide:
    DFM with the identity as forward model, its target observation being the signal itself, seen
    whole and once (no novel view, no subset of pixels). The problem's forward model is not used."""

    kind = "oracle"
    loss_inputs = ("ctxt_obs", "ctxt_params", "signal", "trgt_params")

    def __init__(self, denoiser, forward_model=None, timesteps=1000, **dfm_kwargs):
        super().__init__(denoiser, identity, timesteps, **dfm_kwargs)


def make_model(kind, denoiser, forward_model, timesteps=1000, **dfm_kwargs):
    """kind: "dfm" (the method), "deterministic" (no diffusion) or "oracle" (diffusion on the signal).
    The model carries its kind (model.kind), so nothing downstream needs to be told."""
    models = {"dfm": DFM, "deterministic": Deterministic, "oracle": Oracle}
    if kind not in models:
        raise ValueError(f"unknown model kind {kind!r}: expected 'dfm', 'deterministic' or 'oracle'")
    if kind == "deterministic":
        dfm_kwargs.pop("ctxt_drop_prob", None)  # nothing to guide
    return models[kind](denoiser, forward_model, timesteps, **dfm_kwargs)


# -----------------------------------------------------------------------------
# n samples per context


def sample_signals(model, batch, n_samples, generator=None, steps=50, **sample_kwargs):
    """n_samples signals for each context of a batch (sample_batch's keys): (B, n_samples, *signal_shape).

    How every problem draws its samples for scoring. The oracle samples the signal directly (its
    'observation' is the signal); DFM and the deterministic model sample the target view and
    return the signal behind it. A signal that is not a tensor (the 3D field) comes back as one
    batch of B * n_samples signals, context i's in rows i * n_samples to (i + 1) * n_samples - 1.
    """
    B = batch["ctxt_obs"].shape[0]
    ctxt_obs, ctxt_params, trgt_params = (repeat_batch(batch[k], n_samples)
                                          for k in ("ctxt_obs", "ctxt_params", "trgt_params"))
    obs_shape = tuple((batch["signal"] if model.kind == "oracle" else batch["trgt_obs"]).shape[1:])
    signal, _ = model.sample(ctxt_obs, ctxt_params, trgt_params, steps=steps, generator=generator,
                             obs_shape=obs_shape, **sample_kwargs)
    return signal.view(B, n_samples, *signal.shape[1:]) if isinstance(signal, torch.Tensor) else signal


def repeat_batch(x, n):
    """(B, ...) -> (B * n, ...), each item repeated n times in a row; works on dicts of tensors."""
    return _map_params(lambda v: v.repeat_interleave(n, dim=0), x)


# -----------------------------------------------------------------------------
# Building blocks that the toy problems' denoisers share


def timestep_embedding(t, dim=64):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017): (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock2d(nn.Module):
    """Two 3x3 convolutions with a residual connection, modulated by the timestep (FiLM)."""

    def __init__(self, ch, temb_dim):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, ch), nn.GroupNorm(8, ch)
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(temb_dim, 2 * ch)

    def forward(self, x, temb):  # x (B, ch, H, W), temb (B, temb_dim)
        scale, shift = self.film(temb)[..., None, None].chunk(2, dim=1)  # (B, ch, 1, 1) each
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return x + h


# -----------------------------------------------------------------------------
# Distances between sample sets, for scoring against an exact posterior


def energy_distance(x, y):
    """Energy distance between sample sets, one per batch item: x (B, n, D), y (B, m, D) -> (B,).

    E = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), with all pairs averaged
    (V-statistics), so two finite sets from the same distribution give a small positive
    number: report it as the floor. It is zero only for identical distributions.
    """
    x, y = x.flatten(2).double(), y.flatten(2).double()
    xy = torch.cdist(x, y).mean(dim=(1, 2))
    xx = torch.cdist(x, x).mean(dim=(1, 2))
    yy = torch.cdist(y, y).mean(dim=(1, 2))
    return (2 * xy - xx - yy).float()


# -----------------------------------------------------------------------------
# Small helpers: pixels, params (a tensor or a dict of tensors), and the argument checks


def select_pixels(obs, pixels):
    """obs (B, C, *image), pixels (B, P) indices into the flattened image -> (B, C, P); all of obs if pixels is None."""
    if pixels is None:
        return obs
    flat = obs.flatten(2)  # (B, C, H*W)
    return flat.gather(2, pixels[:, None, :].expand(-1, flat.shape[1], -1))


def map_batch(fn, batch):
    """Apply fn to every tensor of a batch dict whose values are tensors or dicts of tensors (cameras)."""
    return {k: _map_params(fn, v) for k, v in batch.items()}


def _map_params(fn, params):
    return {k: fn(v) for k, v in params.items()} if isinstance(params, dict) else fn(params)


def _first_tensor(params):
    return next(iter(params.values())) if isinstance(params, dict) else params


def _cat_params(a, b):
    """Concatenate two params along dim 1 (the context axis)."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]], dim=1) for k in a}
    return torch.cat([a, b], dim=1)


def _make_generator(generator, device):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int):
        return torch.Generator(device=device).manual_seed(generator)
    raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")


def _check_context(ctxt_obs, ctxt_params, trgt_params):
    """Contexts carry an explicit Nc axis: obs (B, Nc, *obs_shape), params (B, Nc, *param_shape)."""
    cp, tp = _first_tensor(ctxt_params), _first_tensor(trgt_params)
    if cp.dim() != tp.dim() + 1:
        raise ValueError(
            f"ctxt_params has shape {tuple(cp.shape)} but trgt_params has shape {tuple(tp.shape)}: "
            "contexts must have an Nc axis, ctxt_params (B, Nc, *param_shape) and trgt_params (B, *param_shape); "
            "for a single context use ctxt_params.unsqueeze(1) and ctxt_obs.unsqueeze(1)")
    if ctxt_obs.dim() < 2 or ctxt_obs.shape[:2] != cp.shape[:2]:
        raise ValueError(
            f"ctxt_obs has shape {tuple(ctxt_obs.shape)} but ctxt_params has shape {tuple(cp.shape)}: "
            "expected ctxt_obs (B, Nc, *obs_shape) with the same (B, Nc) as ctxt_params")
    if tp.shape[0] != cp.shape[0]:
        raise ValueError(f"batch sizes differ: contexts have B={cp.shape[0]}, targets B={tp.shape[0]}")


def _check_timestep(t, B, timesteps):
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"t must be an integer tensor of shape (B,) with values in [0, {timesteps}), "
                        f"got {t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.shape != (B,):
        raise ValueError(f"t must have shape (B,) = ({B},), got {tuple(t.shape)}")


def _check_rendered(obs, like, pixels):
    """What forward_model returned must have the shape of the observation it renders (or of its pixels)."""
    expected = like.shape if pixels is None else (*like.shape[:2], pixels.shape[1])
    if obs.shape != expected:
        raise ValueError(f"forward_model(signal, params{'' if pixels is None else ', pixels'}) returned shape "
                         f"{tuple(obs.shape)}, but the observation has shape {tuple(expected)}: they must match")
