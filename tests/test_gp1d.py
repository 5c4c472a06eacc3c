"""The 1D toy: its forward model, its closed-form posterior, and that DFM learns towards it."""
import math

import pytest
import torch

import dfm
import config
import train
from toy_problems import gp1d


def test_forward_reads_the_window():
    signal = torch.arange(2 * gp1d.N, dtype=torch.float32).view(2, gp1d.N)
    obs = gp1d.forward(signal, torch.tensor([[0.0], [10.0]]))
    assert torch.equal(obs[0], signal[0, :gp1d.W]) and torch.equal(obs[1], signal[1, 10:10 + gp1d.W])


def test_batch_has_the_documented_shapes():
    batch = gp1d.sample_batch(5, torch.Generator().manual_seed(0), n_ctxt=3)
    assert batch["ctxt_obs"].shape == (5, 3, gp1d.W) and batch["ctxt_params"].shape == (5, 3, 1)
    assert batch["trgt_obs"].shape == (5, gp1d.W) and batch["signal"].shape == (5, gp1d.N)
    assert torch.equal(batch["trgt_obs"], gp1d.forward(batch["signal"], batch["trgt_params"]))


def test_exact_posterior_samples_reproduce_the_context():
    batch = gp1d.sample_batch(6, torch.Generator().manual_seed(1), n_ctxt=2)
    samples = gp1d.exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], 10, torch.Generator().manual_seed(0))
    assert samples.shape == (6, 10, gp1d.N)
    for i in range(2):
        seen = gp1d.forward(samples.flatten(0, 1), dfm.repeat_batch(batch["ctxt_params"][:, i], 10))
        assert torch.allclose(seen, dfm.repeat_batch(batch["ctxt_obs"][:, i], 10), atol=1e-6)
    assert samples.std(dim=1).max() > 0.3  # and vary elsewhere


def test_one_window_often_leaves_the_component_uncertain():
    """The toy is only interesting if the posterior is often bimodal: about half of single-window contexts."""
    batch = gp1d.sample_batch(300, torch.Generator().manual_seed(0), n_ctxt=1)
    top_weight = torch.tensor([max(w for w, _, _ in gp1d.exact_posterior_mixture(o, p))
                               for o, p in zip(batch["ctxt_obs"], batch["ctxt_params"])])
    assert 0.3 < (top_weight < 0.9).float().mean().item() < 0.7


def test_closed_form_posterior_agrees_with_brute_force_rejection(monkeypatch):
    """On a 4-point grid read one point at a time: keep prior draws whose observed point is within 0.01 of y."""
    monkeypatch.setattr(gp1d, "N", 4)
    monkeypatch.setattr(gp1d, "W", 1)
    monkeypatch.setattr(gp1d, "GRID", torch.linspace(0, 1, 4, dtype=torch.float64))
    y = 0.3
    mixture = gp1d.exact_posterior_mixture(torch.tensor([[y]]), torch.tensor([[0.0]]))
    assert sum(w for w, _, _ in mixture) == pytest.approx(1.0)
    assert 0.55 < mixture[0][0] < 0.95  # y = 0.3 favours the +0.5 component without deciding it

    prior = gp1d.sample_prior(3_000_000, torch.Generator().manual_seed(0)).double()
    kept = prior[(prior[:, 0] - y).abs() < 0.01]  # about 30k draws
    assert len(kept) > 10_000
    far = 3  # the point furthest from the observed one: the most bimodal
    mean = sum(w * m[far] for w, m, _ in mixture)
    second = sum(w * (c[far, far] + m[far] ** 2) for w, m, c in mixture)
    p_positive = sum(w * 0.5 * (1 + math.erf(m[far] / math.sqrt(2 * c[far, far]))) for w, m, c in mixture)
    assert kept[:, far].mean().item() == pytest.approx(mean.item(), abs=0.02)
    assert kept[:, far].std().item() == pytest.approx(math.sqrt(second - mean ** 2), abs=0.02)
    assert (kept[:, far] > 0).double().mean().item() == pytest.approx(p_positive, abs=0.02)


def test_short_training_gets_closer_to_the_exact_posterior(tmp_path):
    cfg = config.make_config("gp1d", steps=200, batch_size=64, lr=2e-3, warmup=20, eval_every=0,
                            ckpt_every=1000, out_dir=str(tmp_path))
    torch.manual_seed(cfg.seed)
    untrained = train.build_model(cfg)
    before = gp1d.evaluate(untrained, n_contexts=16, n_samples=32, steps=10)
    trained, _ = train.train(cfg, progress=False)
    after = gp1d.evaluate(trained, n_contexts=16, n_samples=32, steps=10)
    assert after["window"] < 0.5 * before["window"]
    assert after["signal"] < 0.5 * before["signal"]
    assert after["window_floor"] < after["window"]  # the floor is the floor


def test_plot_writes_a_png(tmp_path):
    torch.manual_seed(0)
    model = dfm.make_model("dfm", gp1d.make_denoiser("dfm"), gp1d.forward)
    gp1d.plot(model, tmp_path / "samples.png", n_samples=2, steps=2)
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timestep_weights_give_the_low_noise_steps_unit_variance_targets_and_every_t_a_chance():
    model = dfm.make_model("dfm", gp1d.make_denoiser("dfm"), gp1d.forward)
    p, scale = model.t_probs, gp1d.precondition(model.abar)[1]  # (T,) each
    assert torch.isclose(p.sum(), torch.tensor(1.0)) and (p >= 0.5 / len(p)).all()  # half of them uniform
    low = torch.arange(gp1d.LOW_NOISE_CAP, 200)  # above the cap: p - uniform share proportional to 1 / scale^2
    ratio = (p[low] - 0.5 / len(p)) * scale[low] ** 2
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert p[0] == p[gp1d.LOW_NOISE_CAP] and p[0] > 10 * p[-1]  # capped, and far more often than at high noise


def test_preconditioning_follows_what_the_noisy_target_covers():
    """In the target window the output is skip * x_t + scale(t) * net; off it (and off the context) x_t says
    nothing, so the network's output there is scaled to the prior's size at every t, not shrunk with the noise."""
    torch.manual_seed(0)
    model = dfm.make_model("dfm", gp1d.make_denoiser("dfm"), gp1d.forward)
    denoiser = model.denoiser
    torch.nn.init.zeros_(denoiser.out[-1].weight)
    torch.nn.init.ones_(denoiser.out[-1].bias)  # the network's output is 1 everywhere
    ctxt_obs, ctxt_params = torch.zeros(2, 1, gp1d.W), torch.tensor([[[0.0]], [[0.0]]])  # context on 0..7
    trgt_params = torch.tensor([[16.0], [16.0]])  # target window on 16..23
    x_t, t = torch.full((2, gp1d.W), 0.3), torch.tensor([0, 900])
    out = denoiser(ctxt_obs, ctxt_params, x_t, trgt_params, t)  # (2, N)
    skip, scale = gp1d.precondition(model.abar[t].unsqueeze(1))  # (2, 1) each
    assert torch.allclose(out[:, :8], torch.zeros(2, 8))  # the context is copied
    assert torch.allclose(out[:, 16:24], (skip * 0.3 + scale).expand(2, 8))
    assert torch.allclose(out[:, 8:16], torch.full((2, 8), gp1d.SIGMA_DATA))  # at both noise levels
    assert torch.allclose(out[:, 24:], torch.full((2, 8), gp1d.SIGMA_DATA))
    oracle = gp1d.make_denoiser("oracle")  # the oracle's noisy target covers the whole signal
    oracle.load_state_dict(denoiser.state_dict())
    oracle.use_schedule(model.abar)
    x_all = torch.full((2, gp1d.N), 0.3)
    assert torch.allclose(oracle(ctxt_obs, ctxt_params, x_all, trgt_params, t)[:, 8:], (skip * 0.3 + scale).expand(2, 24))
