"""Motion prediction toy: the warp, the world, the exact posterior, the scores, and the notebook."""

import pytest
import torch

import dfm
from toy_problems import motion


def batch(n=16, seed=0):
    return motion.sample_batch(n, torch.Generator().manual_seed(seed))


def test_warp_by_zero_motion_is_the_identity():
    first = batch()["trgt_params"]
    assert torch.allclose(motion.forward(torch.zeros(16, 2, motion.H, motion.W), first), first, atol=1e-5)


def test_warp_by_a_constant_motion_shifts_the_image():
    image = torch.randn(1, 3, motion.H, motion.W)
    moved = motion.warp(image, torch.tensor([2.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, motion.H, motion.W))
    # out(y, x) = image(y - 1, x - 2) wherever that pixel exists
    assert torch.allclose(moved[..., 1:, 2:], image[..., :-1, :-2], atol=1e-5)


def test_warp_is_differentiable_in_the_motion():
    first = batch()["trgt_params"]
    m = torch.full((16, 2, motion.H, motion.W), 0.5, requires_grad=True)
    motion.forward(m, first).square().sum().backward()
    assert m.grad.abs().sum() > 0


def test_ground_truth_motion_renders_the_next_frame():
    b = batch()
    assert torch.allclose(motion.forward(b["signal"], b["trgt_params"]), b["trgt_obs"], atol=1e-5)
    assert torch.equal(b["ctxt_obs"][:, 0], b["trgt_params"])


def test_sprites_and_their_moved_footprints_never_touch():
    masks = motion.random_masks(64, torch.Generator().manual_seed(1))  # (B, K, H, W)
    grown = torch.nn.functional.max_pool2d(masks, 2 * motion.STEP + 1, stride=1, padding=motion.STEP)  # every move
    assert grown.sum(dim=1).max() <= 1  # no pixel reachable by two sprites
    assert torch.equal(motion.sprite_masks(motion.paint(masks)), masks)


def test_reading_moves_off_the_ground_truth_field():
    masks = motion.random_masks(8, torch.Generator().manual_seed(2))
    moves = torch.randint(0, 4, (8, motion.K), generator=torch.Generator().manual_seed(3))
    read = motion.read_moves(motion.motion_field(masks, moves), motion.paint(masks))  # (B, K, 2)
    assert torch.allclose(read, motion.MOVES[moves], atol=1e-5)
    label, dist = motion.classify(read)
    assert torch.equal(label, moves) and dist.max() < 1e-4


def test_exact_posterior_is_uniform_over_the_16_joint_moves_and_renders_legal_frames():
    b = batch(2)
    samples = motion.exact_posterior(b["ctxt_obs"], b["ctxt_params"], 4000, torch.Generator().manual_seed(0))
    first = b["trgt_params"].repeat_interleave(4000, dim=0)
    label, _ = motion.classify(motion.read_moves(samples.flatten(0, 1), first))  # (B*n, K)
    counts = torch.bincount(label[:, 0] * 4 + label[:, 1], minlength=16).float()
    assert counts.numel() == 16  # every sample is one of the 16 allowed combinations
    assert (counts / counts.sum() - 1 / 16).abs().max() < 0.015
    frames = motion.forward(samples.flatten(0, 1), first)
    painted = motion.paint(motion.shift(motion.sprite_masks(first), label))
    assert torch.allclose(frames, painted, atol=1e-5)


def test_scores_separate_exact_samples_from_a_mean_and_a_single_mode():
    b = batch(8)
    first = b["trgt_params"]
    exact = motion.exact_posterior(b["ctxt_obs"], b["ctxt_params"], 256, torch.Generator().manual_seed(0))
    good = motion.motion_scores(exact, first)
    mean = motion.motion_scores(torch.zeros_like(exact), first)  # the conditional mean: no motion at all
    one = motion.motion_scores(exact[:, :1].expand_as(exact), first)  # always the same allowed motion
    assert good["tv_sprite"] < 0.1 and good["tv_joint"] < 0.2 and good["off_grid"] < 1e-4
    assert mean["tv_sprite"] == pytest.approx(1.0) and mean["off_grid"] == pytest.approx(motion.STEP)
    assert one["tv_sprite"] == pytest.approx(0.75) and one["tv_joint"] == pytest.approx(15 / 16)


@pytest.mark.parametrize("kind", ["dfm", "deterministic", "oracle"])
def test_loss_gradients_reach_every_denoiser_weight(kind):
    torch.manual_seed(0)
    model = dfm.make_model(kind, motion.make_denoiser(kind), motion.forward)
    b = batch(4)
    model(b).backward()  # the oracle is supervised with the signal itself
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = dfm.make_model("dfm", motion.make_denoiser("dfm"), motion.forward)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = batch(16)
    losses = []
    for _ in range(30):
        loss = model.loss(b["ctxt_obs"], b["ctxt_params"], b["trgt_obs"], b["trgt_params"])
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("kind", ["dfm", "oracle"])
def test_evaluate_and_plot_run_on_an_untrained_model(kind, tmp_path):
    model = dfm.make_model(kind, motion.make_denoiser(kind), motion.forward)
    scores = motion.evaluate(model, n_contexts=2, n_samples=4, steps=2)
    assert {"tv_sprite", "tv_joint", "off_grid", "tv_joint_floor", "frame_mse"} <= scores.keys()
    motion.plot(model, tmp_path / "motion.png", n_samples=2, steps=2)
    assert (tmp_path / "motion.png").stat().st_size > 0


def test_motion_and_gan_notebook_runs_top_to_bottom_with_the_shipped_weights(run_notebook):
    notebook = run_notebook("motion_and_gan.ipynb")
    bars = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []) if o.get("name") == "stderr")
    assert not any(f"{problem}/dfm" in bars for problem in ("motion", "gan_inversion"))  # no training bar


def test_motion_and_gan_notebook_trains_every_model_on_its_switch(run_notebook):
    notebook = run_notebook("motion_and_gan.ipynb", ("TRAIN = False", "TRAIN = True"))
    bars = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []) if o.get("name") == "stderr")
    assert all(f"{problem}/{kind}: 100%" in bars for problem in ("motion", "gan_inversion")  # training shows progress
               for kind in ("dfm", "deterministic", "oracle")), bars[-2000:]
