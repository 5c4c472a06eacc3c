"""The exact denoiser behind experiments/diagnose.py: its closed form (gp1d) against Monte Carlo over exact
posterior samples, the sample-based one on cases worked by hand, DFM's sampler driven by it, and the command."""
import math
import sys

import pytest
import torch

import dfm
import train
from experiments import diagnose
from toy_problems import gp1d


def noised(x, abar, generator):
    a = abar.view(-1, *[1] * (x.dim() - 1))
    return a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=generator)


def test_the_closed_form_denoiser_of_gp1d_agrees_with_monte_carlo_over_exact_samples():
    generator = torch.Generator().manual_seed(0)
    batch = gp1d.held_out_batch(4, seed=3)
    signals = gp1d.exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], 20000, generator)  # (B, M, N)
    renders = diagnose.target_renders(gp1d, batch, signals)  # (B, M, W)
    abar_all = dfm.schedule(1000)["abar"]
    window = gp1d.exact_denoiser(batch["ctxt_obs"], batch["ctxt_params"], batch["trgt_params"])
    whole = gp1d.exact_denoiser(batch["ctxt_obs"], batch["ctxt_params"])
    for t in (300, 600, 900):
        abar = abar_all[t].expand(4)
        x_t = noised(batch["trgt_obs"], abar, generator)
        assert torch.allclose(window(x_t, abar), diagnose.exact_x0(x_t, renders, abar), atol=0.02)
        s_t = noised(batch["signal"], abar, generator)
        assert torch.allclose(whole(s_t, abar), diagnose.exact_x0(s_t, signals, abar), atol=0.04)
    # almost no noise left (sd 0.01): about the observation itself; all noise: the posterior mean of the window
    little = torch.full((4,), 0.9999)
    assert torch.allclose(window(noised(batch["trgt_obs"], little, generator), little), batch["trgt_obs"], atol=0.03)
    assert torch.allclose(window(torch.randn(4, gp1d.W), torch.full((4,), 1e-10)), renders.mean(1), atol=0.02)


def test_the_sample_based_denoiser_weighs_each_sample_by_the_likelihood_of_x_t():
    renders = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # (B=1, M=2, D=2): two equally likely observations
    abar = torch.tensor([0.5])
    x_t = torch.tensor([[0.3, 2.0]])
    # p(i | x_t) prop. to exp(-|x_t - sqrt(abar) r_i|^2 / (2 (1 - abar))): a logistic in x_t's first coordinate
    w1 = 1 / (1 + math.exp(-2 * math.sqrt(0.5) * 0.3 * 2 / (2 * 0.5)))
    expected = torch.tensor([[w1 - (1 - w1), 0.0]])
    assert torch.allclose(diagnose.exact_x0(x_t, renders, abar), expected, atol=1e-6)
    same = renders[:, :1].expand(1, 5, 2)  # one observation, five times: the answer whatever x_t
    assert torch.allclose(diagnose.exact_x0(torch.randn(1, 2), same, abar), renders[:, 0])


def test_the_best_dfm_denoiser_is_a_render_nearer_the_exact_x0_than_any_exact_sample():
    from toy_problems import gan_inversion
    generator = torch.Generator().manual_seed(0)
    for problem, atol in ((gp1d, 1e-3), (gan_inversion, None)):
        batch = problem.held_out_batch(3, seed=1)
        signals = problem.exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], 64, generator)
        renders = diagnose.target_renders(problem, batch, signals)  # (B, M, *obs_shape)
        x0 = renders.mean(1)  # the exact x0 at t = T: the mean of the renders
        best = diagnose.in_range(problem, batch["trgt_params"], renders, signals)(x0)
        nearest = (renders - x0[:, None]).pow(2).flatten(2).sum(-1).min(1).values  # (B,)
        assert ((best - x0).pow(2).flatten(1).sum(1) <= nearest + 1e-6).all()
        if atol:  # gp1d's window reaches every observation: the mean of windows is the window of a signal
            assert torch.allclose(best, x0, atol=atol)
        else:  # the mean of the GAN's hidden halves is no generator's output: the best render stays away
            assert (best - x0).pow(2).flatten(1).sum(1).min() > 1e-3


def test_dfms_sampler_driven_by_the_exact_denoiser_draws_the_samples_in_their_proportions():
    n = 400
    renders = torch.tensor([[[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]]).repeat_interleave(n, 0)
    model = dfm.DFM(diagnose.ExactDenoiser(lambda x_t, abar: diagnose.exact_x0(x_t, renders, abar)), dfm.identity)
    ctxt = torch.zeros(n, 1, 3)
    _, obs = model.sample(ctxt, torch.zeros(n, 1, 1), torch.zeros(n, 1), steps=50, generator=0)
    assert torch.allclose(obs.abs(), torch.ones_like(obs), atol=1e-3)  # each sample is one of the renders
    share = (obs[:, 0] > 0).float().mean().item()  # 1/3 of the mass is on the first render; sd about 0.024
    assert abs(share - 1 / 3) < 0.1


@pytest.mark.parametrize("problem", ["gp1d", "gan_inversion"])
def test_the_diagnostics_run_on_a_checkpoint_and_print_the_three_checks(problem, tmp_path, monkeypatch, capsys):
    import config
    for kind in ("dfm", "oracle"):
        cfg = config.make_config(problem, model=kind, steps=2, batch_size=4, eval_every=0,
                                 out_dir=str(tmp_path / kind))
        train.train(cfg, progress=False)
    monkeypatch.setattr(sys, "argv", ["diagnose", str(tmp_path / "dfm" / "ckpt.pt"), "--oracle",
                                      str(tmp_path / "oracle" / "ckpt.pt"), "--n-contexts", "2",
                                      "--n-samples", "4", "--exact", "64", "--steps", "5",
                                      "--save", str(tmp_path / "diagnose.json")])
    diagnose.main()
    out = capsys.readouterr().out
    assert "1. the sampler" in out and out.count("2. x0 estimates") == 2 and out.count("3. spread") == 2
    assert "ddpm" in out and out.count("best DFM denoiser") >= 2  # check 1's in-range sampler, check 3's spread
    from experiments import tables
    table = tables.table_of(str(tmp_path / "diagnose.json"))  # every number printed, as RESULTS.md shows it
    assert table.startswith("Made by `python -m experiments.diagnose ") and "| ddpm 250 |" in table
    assert "| t | dfm rmse | dfm slope | dfm residual | oracle rmse |" in table and "| 950 |" in table
    assert "| best DFM rmse | best DFM slope |" in table and "| ddim 50, best DFM denoiser |" in table
    assert "| ddim 50, the dfm model's own denoiser |" in table and "| ddim 50, the oracle model's own denoiser |" in table


def test_the_diagnostics_refuse_what_they_cannot_diagnose_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["diagnose", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit) as stop:
        diagnose.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: no checkpoint") and err.count("\n") == 1, err
