"""The method itself, on tiny forward models whose right answers we can write down."""
import math

import pytest
import torch
import torch.nn as nn

import dfm


# -- schedule ----------------------------------------------------------------------------------


def test_cosine_schedule_matches_its_closed_form():
    s = dfm.schedule(1000, "cosine")
    assert torch.allclose(s["abar"], torch.cumprod(1 - s["betas"], 0))
    t = torch.arange(1000, dtype=torch.float64)
    f = lambda u: torch.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    unclipped = s["betas"] < 0.999
    assert torch.allclose(s["abar"][unclipped].double(), (f(t + 1) / f(torch.tensor(0.0)))[unclipped], atol=1e-5)
    assert s["betas"].max() <= 0.999 and (s["betas"] > 0).all()
    assert s["abar"][0] > 0.9999 and s["abar"][-1] < 1e-6
    assert (s["abar"][1:] < s["abar"][:-1]).all()  # noise only ever grows


def test_linear_schedule_endpoints():
    s = dfm.schedule(1000, "linear")
    assert s["betas"][0] == pytest.approx(1e-4) and s["betas"][-1] == pytest.approx(0.02)
    assert torch.allclose(s["abar"], torch.cumprod(1 - s["betas"], 0))


def test_unknown_schedule_is_named_in_the_error():
    with pytest.raises(ValueError, match="quadratic"):
        dfm.schedule(10, "quadratic")


# -- a tiny problem: the signal is a vector, each observation reads a few of its entries -------

D, K = 6, 3  # signal size, entries per observation


def read(signal, params):
    """Observation = the signal at K indices given by params (B, K) (a linear forward model)."""
    return signal.gather(1, params.long())


class TinyDenoiser(nn.Module):
    def __init__(self, obs_size=K):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * K + obs_size + 1, 32), nn.SiLU(), nn.Linear(32, D))
        self.seen_n_ctxt = []

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        self.seen_n_ctxt.append(ctxt_obs.shape[1])
        return self.net(torch.cat([ctxt_obs.mean(1), noisy_trgt, trgt_params.float(), t.float()[:, None] / 1000], 1))


def tiny_batch(B=4, Nc=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(B, D, generator=g)
    ctxt_params = torch.randint(0, D, (B, Nc, K), generator=g)
    trgt_params = torch.randint(0, D, (B, K), generator=g)
    ctxt_obs = torch.stack([read(signal, ctxt_params[:, i]) for i in range(Nc)], 1)
    return ctxt_obs, ctxt_params, read(signal, trgt_params), trgt_params


def test_gradients_flow_from_the_loss_through_the_forward_model_into_the_denoiser():
    model = dfm.DFM(TinyDenoiser(), read, timesteps=100)
    ctxt_obs, ctxt_params, trgt_obs, trgt_params = tiny_batch()
    loss = model.loss(ctxt_obs, ctxt_params, trgt_obs, trgt_params, trgt_obs, trgt_params)
    assert loss.dim() == 0
    loss.backward()
    for p in model.denoiser.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # The signal entries that the target never reads get no gradient: the loss lives in observation space.
    last = model.denoiser.net[-1].weight.grad.abs().sum(1)  # (D,) one row per signal entry
    unread = torch.ones(D, dtype=torch.bool)
    unread[trgt_params.flatten()] = False
    assert (last[unread] == 0).all() and (last[~unread] > 0).all()


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_samplers_return_documented_shapes_and_are_reproducible(sampler, eta):
    model = dfm.DFM(TinyDenoiser(), read, timesteps=100)
    ctxt_obs, ctxt_params, _, trgt_params = tiny_batch(B=5)
    signal, obs = model.sample(ctxt_obs, ctxt_params, trgt_params, steps=10, sampler=sampler, eta=eta, generator=7)
    assert signal.shape == (5, D) and obs.shape == (5, K)
    assert torch.equal(obs, read(signal, trgt_params))  # the returned obs renders the returned signal
    again, _ = model.sample(ctxt_obs, ctxt_params, trgt_params, steps=10, sampler=sampler, eta=eta,
                            generator=torch.Generator().manual_seed(7))
    other, _ = model.sample(ctxt_obs, ctxt_params, trgt_params, steps=10, sampler=sampler, eta=eta, generator=8)
    assert torch.equal(signal, again)
    assert not torch.equal(signal, other)


class ExactGaussianDenoiser(nn.Module):
    """For x0 ~ N(0, s^2) (1D), E[x0 | x_t] = sqrt(abar) s^2 / (abar s^2 + 1 - abar) x_t: a perfect denoiser."""

    def __init__(self, abar, s):
        super().__init__()
        self.abar, self.s = abar, s

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        a = self.abar[t].view(-1, 1)
        return a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a) * noisy_trgt


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 100), ("ddim", 100)])
def test_samplers_with_a_perfect_denoiser_draw_from_the_data_distribution(sampler, steps):
    s = 0.5
    model = dfm.DFM(nn.Identity(), dfm.identity, timesteps=1000)  # denoiser swapped in below
    model.denoiser = ExactGaussianDenoiser(model.abar, s)
    n = 4000
    ctxt = torch.zeros(n, 1, 1)
    signal, _ = model.sample(ctxt, torch.zeros(n, 1, 1), torch.zeros(n, 1), steps=steps, sampler=sampler, generator=0)
    assert signal.mean().abs() < 0.05
    assert signal.std().item() == pytest.approx(s, rel=0.06)


def test_temperature_scales_the_initial_noise():
    model = dfm.DFM(nn.Identity(), dfm.identity, timesteps=1000)
    model.denoiser = ExactGaussianDenoiser(model.abar, 0.5)
    n = 4000
    args = (torch.zeros(n, 1, 1), torch.zeros(n, 1, 1), torch.zeros(n, 1))
    cold, _ = model.sample(*args, steps=50, generator=0, temperature=0.5)
    warm, _ = model.sample(*args, steps=50, generator=0)
    assert cold.std().item() == pytest.approx(0.5 * warm.std().item(), rel=0.02)  # DDIM (eta 0) is linear in x_T here


def test_guidance_scale_one_is_plain_sampling_and_other_scales_change_the_sample():
    model = dfm.DFM(TinyDenoiser(), read, timesteps=100, ctxt_drop_prob=0.1)
    ctxt_obs, ctxt_params, _, trgt_params = tiny_batch()
    plain, _ = model.sample(ctxt_obs, ctxt_params, trgt_params, steps=5, generator=0)
    one, _ = model.sample(ctxt_obs, ctxt_params, trgt_params, steps=5, generator=0, guidance=1.0)
    two, _ = model.sample(ctxt_obs, ctxt_params, trgt_params, steps=5, generator=0, guidance=2.0)
    assert torch.equal(plain, one) and not torch.allclose(plain, two)


def test_context_dropout_hides_the_context_at_the_requested_rate():
    seen = []

    class Spy(TinyDenoiser):
        def forward(self, ctxt_obs, *rest):
            seen.append((ctxt_obs.flatten(1) == 0).all(1))
            return super().forward(ctxt_obs, *rest)

    model = dfm.DFM(Spy(), read, timesteps=100, ctxt_drop_prob=0.3)
    ctxt_obs, ctxt_params, trgt_obs, trgt_params = tiny_batch(B=2000)
    torch.manual_seed(0)
    model.loss(ctxt_obs + 10, ctxt_params, trgt_obs, trgt_params)
    assert seen[0].float().mean().item() == pytest.approx(0.3, abs=0.04)


def test_autoregressive_sampling_grows_the_context_one_observation_at_a_time():
    denoiser = TinyDenoiser()
    model = dfm.DFM(denoiser, read, timesteps=100)
    ctxt_obs, ctxt_params, _, trgt_params = tiny_batch(B=3, Nc=1)
    signal, obs = model.sample_autoregressive(ctxt_obs, ctxt_params, [trgt_params] * 3, steps=2, generator=0)
    assert signal.shape == (3, D) and obs.shape == (3, 3, K)
    assert denoiser.seen_n_ctxt == [1, 1, 2, 2, 3, 3]


def test_deterministic_model_ignores_the_seed_and_oracle_observes_the_signal():
    det = dfm.make_model("deterministic", TinyDenoiser(), read, timesteps=100)
    ctxt_obs, ctxt_params, trgt_obs, trgt_params = tiny_batch()
    a, _ = det.sample(ctxt_obs, ctxt_params, trgt_params, generator=0)
    b, _ = det.sample(ctxt_obs, ctxt_params, trgt_params, generator=1)
    assert torch.equal(a, b)
    det.loss(ctxt_obs, ctxt_params, trgt_obs, trgt_params).backward()
    oracle = dfm.make_model("oracle", TinyDenoiser(obs_size=D), read, timesteps=100)
    assert det.kind == "deterministic" and oracle.kind == "oracle"
    assert dfm.make_model("dfm", TinyDenoiser(), read).kind == "dfm"
    batch = dict(ctxt_obs=ctxt_obs, ctxt_params=ctxt_params, trgt_obs=trgt_obs, trgt_params=trgt_params,
                 signal=torch.randn(4, D))
    signals = dfm.sample_signals(oracle, batch, 3, generator=0, steps=4)
    assert signals.shape == (4, 3, D)
    oracle(batch).backward()  # supervised with the signal: the oracle's 'observation' is (B, D), not (B, K)
    with pytest.raises(ValueError, match="kind"):
        dfm.make_model("pixelnerf", TinyDenoiser(), read)


def test_model_is_a_module_that_holds_the_denoiser():
    model = dfm.DFM(TinyDenoiser(), forward_model=read, timesteps=100)
    assert model.forward_model is read
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.denoiser.parameters())
    assert all(k.startswith("denoiser.") for k in model.state_dict())


def batch_with_a_novel_view(B=4):
    ctxt_obs, ctxt_params, trgt_obs, trgt_params = tiny_batch(B)
    novel_params = trgt_params.flip(0)
    return dict(ctxt_obs=ctxt_obs, ctxt_params=ctxt_params, trgt_obs=trgt_obs, trgt_params=trgt_params,
                novel_obs=torch.randn(B, K), novel_params=novel_params, signal=torch.randn(B, D))


@pytest.mark.parametrize("kind", ["dfm", "deterministic", "oracle"])
def test_calling_the_model_on_a_batch_is_its_training_loss(kind):
    """model(batch) is what training differentiates: DFM's and the deterministic model's loss on the target
    and the novel view, the oracle's on the signal itself (its observation is the signal)."""
    model = dfm.make_model(kind, TinyDenoiser(obs_size=D if kind == "oracle" else K), read, timesteps=100)
    b = batch_with_a_novel_view()
    torch.manual_seed(3)
    called = model(b)
    torch.manual_seed(3)  # the same t and noise
    if kind == "oracle":
        expected = model.loss(b["ctxt_obs"], b["ctxt_params"], b["signal"], b["trgt_params"])
    else:
        expected = model.loss(b["ctxt_obs"], b["ctxt_params"], b["trgt_obs"], b["trgt_params"],
                              b["novel_obs"], b["novel_params"])
    assert torch.equal(called, expected)
    torch.manual_seed(3)
    without_novel = model({k: v for k, v in b.items() if not k.startswith("novel")})
    assert torch.equal(without_novel, called) == (kind == "oracle")  # the oracle has no novel view to explain


@pytest.mark.parametrize("kind", ["dfm", "deterministic"])
def test_the_novel_weight_scales_the_novel_views_term_and_nothing_else(kind):
    b = batch_with_a_novel_view()
    losses = {}
    for weight in (0.0, 0.25, 1.0):
        torch.manual_seed(0)  # the same initial weights
        model = dfm.make_model(kind, TinyDenoiser(), read, timesteps=100, novel_weight=weight)
        torch.manual_seed(3)  # the same t and noise
        losses[weight] = model(b).item()
    torch.manual_seed(0)
    model = dfm.make_model(kind, TinyDenoiser(), read, timesteps=100)
    torch.manual_seed(3)
    target_only = model({k: v for k, v in b.items() if not k.startswith("novel")}).item()
    novel = losses[1.0] - losses[0.0]
    assert losses[0.0] == pytest.approx(target_only) and novel > 0
    assert losses[0.25] == pytest.approx(losses[0.0] + 0.25 * novel)


def test_a_negative_novel_weight_is_refused():
    with pytest.raises(ValueError, match="novel_weight must be >= 0"):
        dfm.DFM(TinyDenoiser(), read, timesteps=100, novel_weight=-1)


def test_the_deterministic_model_trains_on_the_prediction_it_samples():
    det = dfm.make_model("deterministic", TinyDenoiser(), read, timesteps=100)
    ctxt_obs, ctxt_params, trgt_obs, trgt_params = tiny_batch()
    signal, _ = det.sample(ctxt_obs, ctxt_params, trgt_params)
    assert torch.allclose(det.loss(ctxt_obs, ctxt_params, trgt_obs, trgt_params),
                          ((read(signal, trgt_params) - trgt_obs) ** 2).mean())


# -- bad input gets a clear error --------------------------------------------------------------


def test_forward_model_with_the_wrong_output_shape_is_reported():
    model = dfm.DFM(TinyDenoiser(), lambda s, p: s, timesteps=100)  # returns (B, D), target is (B, K)
    ctxt_obs, ctxt_params, trgt_obs, trgt_params = tiny_batch()
    with pytest.raises(ValueError, match=r"forward_model\(signal, params\) returned shape \(4, 6\).*\(4, 3\)"):
        model.loss(ctxt_obs, ctxt_params, trgt_obs, trgt_params)


def test_float_timestep_is_reported():
    model = dfm.DFM(TinyDenoiser(), read, timesteps=100)
    ctxt_obs, ctxt_params, trgt_obs, trgt_params = tiny_batch()
    with pytest.raises(TypeError, match="integer tensor"):
        model.denoise(ctxt_obs, ctxt_params, trgt_obs, trgt_params, torch.full((4,), 0.5))


def test_context_without_the_nc_axis_is_reported():
    model = dfm.DFM(TinyDenoiser(), read, timesteps=100)
    ctxt_obs, ctxt_params, trgt_obs, trgt_params = tiny_batch(Nc=1)
    with pytest.raises(ValueError, match="Nc axis"):
        model.loss(ctxt_obs[:, 0], ctxt_params[:, 0], trgt_obs, trgt_params)
    with pytest.raises(ValueError, match="Nc axis"):
        model.sample(ctxt_obs[:, 0], ctxt_params[:, 0], trgt_params)


def test_a_batch_without_what_the_model_trains_on_is_reported():
    oracle = dfm.make_model("oracle", TinyDenoiser(obs_size=D), read, timesteps=100)
    b = batch_with_a_novel_view()
    del b["signal"]
    with pytest.raises(ValueError, match="oracle model trains on .*the batch has no signal"):
        oracle(b)


def test_unknown_sampler_is_named_in_the_error():
    model = dfm.DFM(TinyDenoiser(), read, timesteps=100)
    ctxt_obs, ctxt_params, _, trgt_params = tiny_batch()
    with pytest.raises(ValueError, match="'euler'"):
        model.sample(ctxt_obs, ctxt_params, trgt_params, sampler="euler")


# -- distances between sample sets -------------------------------------------------------------


def test_energy_distance_of_two_point_masses_is_twice_their_distance():
    x = torch.zeros(1, 5, 2)
    y = torch.tensor([3.0, 4.0]).expand(1, 7, 2)
    assert dfm.energy_distance(x, y).item() == pytest.approx(10.0)
    assert dfm.energy_distance(x, x).item() == 0.0


def test_energy_distance_tells_a_shifted_distribution_from_the_floor():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 200, 4, generator=g)
    floor = dfm.energy_distance(a, b)
    shifted = dfm.energy_distance(a, b + 1.0)
    assert (shifted > 5 * floor).all()


# -- losses on part of the target, pluggable losses, auxiliary terms --------------------------------


class Image1d(nn.Module):
    """A denoiser whose signal is itself a tiny image (B, 2, 5) and whose forward model renders any
    subset of its pixels (a 'patch'), so a loss on part of the target can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(10 + 10 + 1, 10)

    def forward(self, ctxt_obs, ctxt_params, noisy_trgt, trgt_params, t):
        x = torch.cat([ctxt_obs.flatten(1), noisy_trgt.flatten(1), t.float()[:, None] / 100], 1)
        return self.net(x).view(-1, 2, 5)


def render_pixels(signal, params, pixels=None):
    """obs = 2 * signal (B, 2, 5); with pixels (B, P) only those pixels (B, 2, P), and no extras."""
    obs = 2 * signal
    return obs if pixels is None else (dfm.select_pixels(obs, pixels), None)


def image_batch(B=3):
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(B, 2, 5, generator=g)
    params = torch.zeros(B, 1)
    return dict(ctxt_obs=2 * signal[:, None], ctxt_params=params[:, None], trgt_obs=2 * signal, trgt_params=params)


def test_a_patch_loss_equals_the_full_loss_restricted_to_the_patch():
    torch.manual_seed(0)
    model = dfm.DFM(Image1d(), render_pixels, timesteps=50)
    b = image_batch()
    pixels = torch.tensor([[0, 1, 2], [2, 3, 4], [4, 0, 1]])  # (B, P) a different patch per example

    def elementwise(pred, target):  # keep every pixel's squared error, to restrict it by hand afterwards
        return (pred - target) ** 2

    torch.manual_seed(1)
    model.obs_loss = elementwise
    full = model.loss(b["ctxt_obs"], b["ctxt_params"], b["trgt_obs"], b["trgt_params"])  # (B, 2, 5)
    torch.manual_seed(1)  # the same t and noise: the denoiser sees the same whole noisy target
    patch = model.loss(b["ctxt_obs"], b["ctxt_params"], b["trgt_obs"], b["trgt_params"], pixels=pixels)  # (B, 2, P)
    assert torch.allclose(patch, dfm.select_pixels(full, pixels))
    torch.manual_seed(1)
    model.obs_loss = torch.nn.functional.mse_loss
    mse = model.loss(b["ctxt_obs"], b["ctxt_params"], b["trgt_obs"], b["trgt_params"], pixels=pixels)
    assert torch.allclose(mse, dfm.select_pixels(full, pixels).mean())
    mse.backward()
    assert model.denoiser.net.weight.grad.abs().sum() > 0


def test_the_loss_is_pluggable_and_a_denoiser_adds_its_own_terms():
    torch.manual_seed(0)
    b = image_batch()
    seen = {}

    class WithAux(Image1d):
        scale = nn.Parameter(torch.tensor(1.0))

        def aux_loss(self, signal, trgt_obs, trgt_params, pixels, extras):
            seen["shapes"] = (signal.shape, trgt_obs.shape)
            return 10.0 * self.scale ** 2  # gradient 20 * scale reaches this parameter only through the aux term

    l1 = lambda pred, target: (pred - target).abs().mean()
    model = dfm.DFM(WithAux(), render_pixels, timesteps=50, obs_loss=l1)
    plain = dfm.DFM(Image1d(), render_pixels, timesteps=50, obs_loss=l1)
    plain.denoiser.net.load_state_dict(model.denoiser.net.state_dict())
    torch.manual_seed(1)
    loss = model(b)
    torch.manual_seed(1)
    assert torch.allclose(loss, plain(b) + 10.0)
    loss.backward()
    assert model.denoiser.scale.grad == pytest.approx(20.0)
    assert seen["shapes"] == ((3, 2, 5), (3, 2, 5))
    det = dfm.make_model("deterministic", WithAux(), render_pixels, timesteps=50)
    assert det(b) > 10.0  # the comparison model gets the same terms


def test_a_denoiser_that_needs_the_schedule_gets_the_models_own():
    class NeedsSchedule(Image1d):
        def use_schedule(self, abar):
            self.abar = abar

    for T in (10, 2000):
        model = dfm.DFM(NeedsSchedule(), render_pixels, timesteps=T, schedule_kind="linear")
        assert model.denoiser.abar is model.abar and len(model.denoiser.abar) == T


def test_training_draws_t_as_the_denoisers_timestep_weights_say_and_uniformly_without_them():
    class Weighted(TinyDenoiser):
        def timestep_weights(self, abar):
            return torch.linspace(1, 4, len(abar))  # t = T-1 four times as often as t = 0

    T, n = 10, 20000
    weighted_model, uniform_model = dfm.DFM(Weighted(), read, timesteps=T), dfm.DFM(TinyDenoiser(), read, timesteps=T)
    torch.manual_seed(0)
    weighted = weighted_model.noisy_target(torch.zeros(n, K))[1]
    expected = torch.linspace(1, 4, T) / torch.linspace(1, 4, T).sum()
    assert torch.allclose(torch.bincount(weighted, minlength=T) / n, expected, atol=0.01)
    torch.manual_seed(0)
    uniform = uniform_model.noisy_target(torch.zeros(n, K))[1]
    assert (torch.bincount(uniform, minlength=T) / n - 1 / T).abs().max() < 0.01
    torch.manual_seed(0)  # without weights, exactly torch.randint's stream: the other problems' runs are unchanged
    assert torch.equal(uniform, torch.randint(0, T, (n,)))


@pytest.mark.parametrize("weights", [torch.ones(9), torch.tensor([1.0] * 9 + [0.0])])
def test_timestep_weights_of_the_wrong_length_or_with_a_zero_are_reported(weights):
    class Bad(TinyDenoiser):
        def timestep_weights(self, abar):
            return weights

    with pytest.raises(ValueError, match="10 positive weights"):
        dfm.DFM(Bad(), read, timesteps=10)
