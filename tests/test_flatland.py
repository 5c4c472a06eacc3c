"""Flatland: the exact renderer, the prior, the exact posterior (against brute force) and the models."""
import itertools
import math
from collections import Counter

import pytest
import torch

import dfm
from toy_problems import flatland


TINY = flatland.World(n_pixels=10, lattice=3, radii=(0.25, 0.4), palette=flatland.WORLD.palette[:3])


def context_camera(n=1, world=flatland.WORLD):
    return flatland.cameras(torch.full((n,), flatland.CONTEXT_ANGLE), world)


def one_disc(x, y, r, color):
    return torch.tensor([[x, y, r, *color]])


def test_exact_renderer_shows_the_nearest_disc_and_black_elsewhere():
    red, green = flatland.WORLD.palette[:2]
    # The context camera sits at (0, -2.5) looking along +y: a red disc in front of a bigger green one.
    discs = torch.cat([one_disc(0.0, -0.5, 0.2, red), one_disc(0.0, 0.5, 0.4, green)])[None]  # (1, 2, 6)
    obs = flatland.render_discs(discs, context_camera())[0]  # (3, W)
    labels = flatland.pixel_labels(obs)
    W = flatland.WORLD.n_pixels
    assert labels[W // 2 - 1] == labels[W // 2] == 0  # the central pixels see red, which occludes green
    assert (labels == 1).sum() > 0 and (labels == -1).sum() > 0  # green peeks out on both sides; then background
    assert torch.all(obs[:, labels == -1] == -1)
    # a disc of radius r at distance d covers the pixels whose rays pass within r of its centre
    _, dirs = flatland.camera_rays({k: v[0] for k, v in context_camera().items()})
    angle = torch.atan2(dirs[:, 0], dirs[:, 1]).abs()
    assert torch.equal(labels >= 0, angle < math.asin(0.4 / 3.0))  # the green disc at distance 3 bounds the view


def test_prior_scenes_have_distinct_colours_no_overlap_and_one_to_three_discs():
    discs = flatland.sample_discs(500, torch.Generator().manual_seed(0))
    present = discs[..., 2] > 0
    counts = present.sum(1)
    assert set(counts.tolist()) == {1, 2, 3}
    for scene, keep in zip(discs, present):
        scene = scene[keep]
        assert len({tuple(c) for c in scene[:, 3:].tolist()}) == len(scene)
        gaps = torch.cdist(scene[:, :2], scene[:, :2]) - scene[:, None, 2] - scene[None, :, 2]
        assert torch.all(gaps + 10 * torch.eye(len(scene)) > 0)
        assert torch.all(scene[:, :2].abs() + scene[:, 2:3] <= 1 + 1e-6)  # inside the square


def test_exact_posterior_samples_reproduce_the_context_view_exactly():
    batch = flatland.sample_batch(12, torch.Generator().manual_seed(1))
    params = {k: v[:, 0] for k, v in batch["ctxt_params"].items()}
    for b in range(12):
        samples = flatland.posterior_discs(batch["ctxt_obs"][b], {k: v[b:b + 1] for k, v in params.items()}, 64,
                                           torch.Generator().manual_seed(b))
        views = flatland.render_discs(samples, {k: v[b:b + 1].expand(64, *v.shape[1:]) for k, v in params.items()})
        assert torch.equal(views, batch["ctxt_obs"][b, 0].expand(64, -1, -1))


def test_one_view_leaves_depth_uncertain_but_the_direction_fixed():
    red = flatland.WORLD.palette[0]
    obs = flatland.render_discs(one_disc(0.0, 0.0, 0.2, red)[None], context_camera())[:, None]  # (1, 1, 3, W)
    samples = flatland.posterior_discs(obs[0], {k: v[0:1] for k, v in context_camera().items()}, 400,
                                       torch.Generator().manual_seed(0))
    red_disc = samples[:, 0]  # visible colour comes first
    assert torch.allclose(red_disc[:, 3:], torch.tensor(red).expand(400, 3))
    assert red_disc[:, 1].std() > 0.1  # depth varies ...
    assert red_disc[:, 0].abs().max() < 0.15  # ... along the central ray
    assert {round(r, 3) for r in red_disc[:, 2].tolist()} == {0.2, 0.3}  # near-and-small or far-and-large
    assert ((samples[:, :, 2] > 0).sum(1) > 1).any()  # a second disc may hide in its shadow (rarely)


def test_a_second_view_narrows_the_posterior_and_both_views_are_reproduced():
    red = flatland.WORLD.palette[0]
    truth = one_disc(0.1, 0.2, 0.2, red)[None]
    two = flatland.cameras(torch.tensor([flatland.CONTEXT_ANGLE, 0.0]))  # from below and from the right
    obs = flatland.render_discs(truth.expand(2, -1, -1), two)  # (2, 3, W)
    g = torch.Generator().manual_seed(0)
    one_view = flatland.posterior_discs(obs[:1], {k: v[:1] for k, v in two.items()}, 300, g)
    two_views = flatland.posterior_discs(obs, two, 300, g)
    for k in range(2):
        params = {n: v[k:k + 1].expand(300, *v.shape[1:]) for n, v in two.items()}
        assert torch.equal(flatland.render_discs(two_views, params), obs[k:k + 1].expand(300, -1, -1))
    assert two_views[:, 0, 1].std() < 0.5 * one_view[:, 0, 1].std()  # the depth along the first view's rays


def brute_force_posterior(ctxt_obs, params, world):
    """Enumerate every scene of a tiny prior; keep those that render to the context; weight by the prior."""
    cand, palette = flatland.candidates(world), torch.tensor(world.palette)
    K, M = len(palette), world.max_discs
    probs = {}
    for N in range(1, M + 1):
        for colors in itertools.combinations(range(K), N):
            tuples = torch.tensor(list(itertools.product(range(len(cand)), repeat=N)))  # (T, N)
            discs = torch.cat([cand[tuples], palette[list(colors)].expand(len(tuples), N, 3)], dim=-1)  # (T, N, 6)
            d = torch.cdist(discs[..., :2], discs[..., :2]) - discs[..., :, None, 2] - discs[..., None, :, 2]
            valid = (d + 10 * torch.eye(N) > 1e-6).all(dim=(1, 2))
            discs = discs[valid]  # the prior: uniform over non-overlapping tuples given the colours
            prior = 1 / M / math.comb(K, N) / len(discs)
            views = flatland.render_discs(discs, {k: v.expand(len(discs), *v.shape[1:]) for k, v in params.items()}, world)
            for scene in discs[(views == ctxt_obs).all(dim=(1, 2))]:
                probs[scene_key(scene)] = prior
    total = sum(probs.values())
    return {k: v / total for k, v in probs.items()}


def scene_key(scene):
    return tuple(sorted(tuple(round(v, 4) for v in disc) for disc in scene.tolist() if disc[2] > 0))


def test_exact_posterior_agrees_with_brute_force_enumeration_on_a_tiny_world():
    params = context_camera(1, TINY)
    g = torch.Generator().manual_seed(3)
    truth = flatland.sample_discs(1, g, TINY)
    ctxt_obs = flatland.render_discs(truth, params, TINY)  # (1, 3, W)
    expected = brute_force_posterior(ctxt_obs, params, TINY)
    assert len(expected) >= 10  # an ambiguous view: many scenes explain it
    n = 20_000
    samples = flatland.posterior_discs(ctxt_obs, params, n, g, TINY)
    counts = Counter(scene_key(s) for s in samples)
    assert set(counts) <= set(expected)  # every sample explains the view
    total_variation = 0.5 * sum(abs(counts[k] / n - p) for k, p in expected.items())
    assert total_variation < 0.04


def test_volume_rendered_raster_matches_the_exact_view():
    batch = flatland.sample_batch(32, torch.Generator().manual_seed(2))
    obs = flatland.forward(batch["signal"], batch["trgt_params"])
    assert obs.shape == batch["trgt_obs"].shape == (32, 3, flatland.WORLD.n_pixels)
    assert (obs - batch["trgt_obs"]).abs().mean() < 0.05  # only pixels at disc edges differ


@pytest.mark.parametrize("kind", ["dfm", "deterministic", "oracle"])
def test_every_model_trains_and_samples_fields(kind):
    torch.manual_seed(0)
    batch = flatland.sample_batch(4, torch.Generator().manual_seed(0))
    model = dfm.make_model(kind, flatland.make_denoiser(kind), flatland.forward)
    loss = model(batch)  # the oracle is supervised with the scene itself
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    two = {k: ({kk: vv[:2] for kk, vv in v.items()} if isinstance(v, dict) else v[:2]) for k, v in batch.items()}
    signals = dfm.sample_signals(model, two, 3, 0, steps=2)
    assert signals.shape == (2, 3, *flatland.SIGNAL_SHAPE) and signals.abs().max() <= 1


def test_an_untrained_model_scores_far_above_the_floor_and_pictures_are_written(tmp_path):
    torch.manual_seed(0)
    model = dfm.make_model("dfm", flatland.make_denoiser("dfm"), flatland.forward)  # untrained: grey fog
    scores = flatland.evaluate(model, n_contexts=3, n_samples=16, steps=2)
    assert set(scores) == {"views", "views_floor", "position", "position_floor", "psnr", "psnr_exact"}
    assert scores["views"] > 5 * scores["views_floor"] and scores["position"] > 3 * scores["position_floor"]
    assert scores["psnr_exact"] > scores["psnr"]
    flatland.plot(model, tmp_path / "flatland.png", n_contexts=2, n_samples=2, steps=2)
    flatland.animate(model, tmp_path / "flatland.gif", n_frames=4, steps=2)
    assert (tmp_path / "flatland.png").stat().st_size > 0 and (tmp_path / "flatland.gif").stat().st_size > 0


def test_flatland_notebook_runs_top_to_bottom(run_notebook):
    run_notebook("flatland.ipynb")
