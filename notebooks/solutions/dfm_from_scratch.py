"""Solutions to the exercises of notebooks/dfm_from_scratch.ipynb.

Each section below, from one `# %% exercise-N` line to the next, is the whole text of the
notebook's exercise cell N, solved. To paste one into its cell, run there, for example,
`%load -s cosine_schedule,add_noise solutions/dfm_from_scratch.py` (then run the cell again).
`python notebooks/solutions/solve.py OUT.ipynb` writes the whole lesson solved, and the tests
run it so (tests/test_lesson.py), which keeps these sections in step with the notebook's checks.

Answers to the questions of exercise 4 (a forward model one point off):

1. The whole signal, by far: its distance to the exact posterior grows several times over
   (past the conditional mean's), the directly sampled window's only a little.
2. Training asks the window that shifted_forward reads from the predicted signal, one point
   to the right, to match the real window, so the model learns signals moved one point to the
   right of the truth; but the denoiser copies the context windows into its signal at their
   true places. One sampled window, read with the true forward model, is a smooth curve one
   point off: a small error. Whole-signal sampling adds every sampled window to the context,
   where it is again copied in at its true place, beside a prediction that is one point off;
   each next window is conditioned on those mismatched seams, so the errors add up over the
   four windows that cover the signal. The figure shows it: the samples jump where one
   window ends and the next begins (every 8 points).
3. Study 2 tells the same story: in the README's table a one-point shift costs the directly
   sampled window a little and the whole signal a lot, to worse than the deterministic
   model's. Errors compound when samples feed the next sample.
4. A blur of one point barely changes a window of a smooth signal (the GP's lengthscale is
   about 6 points), so the directly sampled window hardly moves; the whole signal, sampled
   window by window, still degrades, as in study 2.
"""
import math

import torch
import torch.nn.functional as F

from toy_problems import gp1d  # the notebook puts the project on sys.path


# %% exercise-1
def cosine_schedule(T, s=0.008):
    """abar (T,): the fraction of signal variance left after t + 1 noising steps (Nichol & Dhariwal 2021, eq. 17)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # beta_t = 1 - abar_t / abar_{t-1}, clipped
    return torch.cumprod(1 - betas, dim=0).float()


def add_noise(x0, t, eps, abar):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: x0 (B, *shape), t (B,), eps like x0."""
    a = abar[t].view(-1, *[1] * (x0.dim() - 1))  # (B, 1, ...): broadcasts over the observation
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


# %% exercise-2
def dfm_loss(denoiser, forward, abar, batch, t, eps):
    """The DFM objective at noise levels t (B,) and noise eps (B, W), on a batch of gp1d.sample_batch."""
    noisy_trgt = add_noise(batch["trgt_obs"], t, eps, abar)  # (B, W): noise the target *observation*
    signal = denoiser(batch["ctxt_obs"], batch["ctxt_params"], noisy_trgt, batch["trgt_params"], t)  # (B, N)
    loss = F.mse_loss(forward(signal, batch["trgt_params"]), batch["trgt_obs"])  # render, compare as observations
    return loss + F.mse_loss(forward(signal, batch["novel_params"]), batch["novel_obs"])  # and a view it was not given


# %% exercise-3
def ddim_sample(denoiser, forward, abar, ctxt_obs, ctxt_params, trgt_params, x, steps):
    """DDIM (eta = 0) from x = x_T (B, W); returns (signal (B, N), forward(signal, trgt_params) (B, W))."""
    ts = torch.linspace(len(abar) - 1, 0, steps).round().long().tolist()
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        a = abar[t]
        a_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0)  # no noise left after the last step
        signal = denoiser(ctxt_obs, ctxt_params, x, trgt_params, torch.full((x.shape[0],), t))
        x0 = forward(signal, trgt_params)  # the denoised observation is a rendering of the signal
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise that x0 implies
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # Song et al. 2021, eq. 12 with sigma = 0
    return signal, forward(signal, trgt_params)


# %% exercise-4
def shifted_forward(signal, params):
    """gp1d.forward, one point to the right: the window starting at p reads points p + 1 .. p + W
    (a window already at the end of the signal stays there)."""
    start = (params[:, :1] + 1).clamp(max=gp1d.N - gp1d.W)  # (B, 1)
    return gp1d.forward(signal, start)
