"""GAN inversion toy: the generator's locality, the exact inversion and posterior, the scores."""
import pytest
import torch

import dfm
from toy_problems import gan_inversion as gan


def batch(n=16, seed=0):
    return gan.sample_batch(n, torch.Generator().manual_seed(seed))


def test_right_latents_do_not_touch_the_left_half_and_vice_versa():
    z = gan.sample_prior(8, torch.Generator().manual_seed(0))
    z_other = z.clone()
    z_other[:, gan.RIGHT] = -z[:, gan.RIGHT]
    left = gan.LEFT_MASK.expand(8, 1, gan.H, gan.W)
    assert torch.equal(gan.forward(z, left), gan.forward(z_other, left))
    assert not torch.allclose(gan.forward(z, 1 - left), gan.forward(z_other, 1 - left))
    z_other = z.clone()
    z_other[:, gan.SHARED] = -z[:, gan.SHARED]  # the shared latents show on both sides
    assert not torch.allclose(gan.forward(z, left), gan.forward(z_other, left))


def test_a_half_hides_exactly_the_other_halfs_bumps():
    hidden = gan.hidden_latents(torch.stack([gan.LEFT_MASK, gan.RIGHT_MASK, torch.ones(1, gan.H, gan.W)]))
    expected = torch.zeros(3, gan.D, dtype=torch.bool)
    expected[0, gan.RIGHT] = expected[1, gan.LEFT] = True
    assert torch.equal(hidden, expected)


def test_context_and_target_are_the_two_halves_of_one_image():
    b = batch()
    assert torch.allclose(b["ctxt_obs"][:, 0] + b["trgt_obs"], b["novel_obs"])
    assert torch.equal(b["ctxt_params"][:, 0] + b["trgt_params"], torch.ones_like(b["trgt_params"]))


def test_inversion_recovers_the_latents_the_context_sees():
    b = batch(32)
    z = gan.invert(b["ctxt_obs"][:, 0], b["ctxt_params"][:, 0])
    seen = ~gan.hidden_latents(b["ctxt_params"][:, 0])
    assert torch.allclose(z.float()[seen], b["signal"][seen], atol=1e-4)


def test_exact_posterior_sample_reproduces_the_visible_region_exactly():
    b = batch(8)
    samples = gan.exact_posterior(b["ctxt_obs"], b["ctxt_params"], 16, torch.Generator().manual_seed(0))
    seen = gan.forward(samples.flatten(0, 1), dfm.repeat_batch(b["ctxt_params"][:, 0], 16))
    assert torch.allclose(seen, dfm.repeat_batch(b["ctxt_obs"][:, 0], 16), atol=1e-5)


def test_hidden_latents_of_the_exact_posterior_follow_the_bimodal_prior():
    b = batch(1)
    samples = gan.exact_posterior(b["ctxt_obs"], b["ctxt_params"], 20000, torch.Generator().manual_seed(0))[0]
    hidden = samples[:, gan.hidden_latents(b["ctxt_params"][:, 0])[0]]  # (n, 3)
    assert hidden.mean(dim=0).abs().max() < 0.03  # the posterior mean is 0 ...
    assert (hidden.abs() < 0.3).float().mean() < 0.01  # ... where almost no sample lies
    assert ((hidden.abs() - gan.MODE).std() - gan.SPREAD).abs() < 0.01
    signs = (hidden > 0).long()
    combos = torch.bincount(signs[:, 0] * 4 + signs[:, 1] * 2 + signs[:, 2], minlength=8).float() / len(hidden)
    assert (combos - 1 / 8).abs().max() < 0.015  # 8 equally likely modes


def test_scores_rank_the_posterior_mean_far_below_exact_samples():
    b = batch(8)
    gen = torch.Generator().manual_seed(0)
    exact_a = gan.exact_posterior(b["ctxt_obs"], b["ctxt_params"], 128, gen)
    exact_b = gan.exact_posterior(b["ctxt_obs"], b["ctxt_params"], 128, gen)
    mean = exact_b.mean(dim=1, keepdim=True).expand_as(exact_b)  # what a regression model would give
    floor = gan.gan_scores(exact_b, exact_a, b["ctxt_obs"], b["ctxt_params"])
    blurred = gan.gan_scores(mean, exact_a, b["ctxt_obs"], b["ctxt_params"])
    assert floor["seen_mse"] < 1e-10
    for key in ("latent", "hidden", "image"):
        assert blurred[key] > 5 * floor[key]


@pytest.mark.parametrize("kind", ["dfm", "deterministic", "oracle"])
def test_loss_gradients_reach_every_denoiser_weight(kind):
    torch.manual_seed(0)
    model = dfm.make_model(kind, gan.make_denoiser(kind), gan.forward)
    b = batch(4)
    model(b).backward()  # the oracle is supervised with the signal itself
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())


@pytest.mark.parametrize("kind", ["dfm", "deterministic", "oracle"])
def test_evaluate_and_plot_run_on_an_untrained_model(kind, tmp_path):
    model = dfm.make_model(kind, gan.make_denoiser(kind), gan.forward)
    scores = gan.evaluate(model, n_contexts=2, n_samples=4, steps=2)
    assert {"latent", "hidden", "image", "seen_mse", "latent_floor", "hidden_floor", "image_floor"} <= scores.keys()
    gan.plot(model, tmp_path / "gan.png", steps=2)
    assert (tmp_path / "gan.png").stat().st_size > 0
