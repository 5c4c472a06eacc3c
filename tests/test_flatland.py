"""Flatland: the exact renderer, the prior's sampler (against the prior it states), the exact posterior
(against brute force and against the sampler) and the models."""
import itertools
import math
from collections import Counter

import pytest
import torch

import dfm
from toy_problems import flatland, flatland_world


TINY = flatland_world.World(n_pixels=10, lattice=3, radii=(0.25, 0.4), palette=flatland_world.WORLD.palette[:3])
# Small but crowded (three discs fit in under a fifth of the tries), with unequal radii at distances
# that r_i + r_j allows and 2 r_i would not: twice the lattice spacing, 0.733, lies between 0.25 + 0.45 and 2 * 0.45.
SMALL = flatland_world.World(n_pixels=12, lattice=4, radii=(0.25, 0.45), palette=flatland_world.WORLD.palette[:3])


def context_camera(n=1, world=flatland_world.WORLD):
    return flatland_world.cameras(torch.full((n,), flatland_world.CONTEXT_ANGLE), world)


def one_disc(x, y, r, color):
    return torch.tensor([[x, y, r, *color]])


def test_exact_renderer_shows_the_nearest_disc_and_black_elsewhere():
    red, green = flatland_world.WORLD.palette[:2]
    # The context camera sits at (0, -2.5) looking along +y: a red disc in front of a bigger green one.
    discs = torch.cat([one_disc(0.0, -0.5, 0.2, red), one_disc(0.0, 0.5, 0.4, green)])[None]  # (1, 2, 6)
    obs = flatland_world.render_discs(discs, context_camera())[0]  # (3, W)
    labels = flatland_world.pixel_labels(obs)
    W = flatland_world.WORLD.n_pixels
    assert labels[W // 2 - 1] == labels[W // 2] == 0  # the central pixels see red, which occludes green
    assert (labels == 1).sum() > 0 and (labels == -1).sum() > 0  # green peeks out on both sides; then background
    assert torch.all(obs[:, labels == -1] == -1)
    # a disc of radius r at distance d covers the pixels whose rays pass within r of its centre
    _, dirs = flatland_world.camera_rays({k: v[0] for k, v in context_camera().items()})
    angle = torch.atan2(dirs[:, 0], dirs[:, 1]).abs()
    assert torch.equal(labels >= 0, angle < math.asin(0.4 / 3.0))  # the green disc at distance 3 bounds the view


def test_prior_scenes_have_distinct_colours_no_overlap_and_one_to_three_discs():
    discs = flatland_world.sample_discs(500, torch.Generator().manual_seed(0))
    present = discs[..., 2] > 0
    counts = present.sum(1)
    assert set(counts.tolist()) == {1, 2, 3}
    for scene, keep in zip(discs, present):
        scene = scene[keep]
        assert len({tuple(c) for c in scene[:, 3:].tolist()}) == len(scene)
        gaps = torch.cdist(scene[:, :2], scene[:, :2]) - scene[:, None, 2] - scene[None, :, 2]
        assert torch.all(gaps + 10 * torch.eye(len(scene)) > 0)
        assert torch.all(scene[:, :2].abs() + scene[:, 2:3] <= 1 + 1e-6)  # inside the square


# -----------------------------------------------------------------------------
# The sampler against the prior it states: N uniform on 1..M, a uniform set of N colours,
# the discs uniform over the non-overlapping configurations.


def chi_square(observed, expected):
    """Pearson's statistic and degrees of freedom; cells expecting fewer than 5 are pooled into one."""
    observed, expected = torch.as_tensor(observed).double(), torch.as_tensor(expected).double()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    return ((observed - expected) ** 2 / expected).sum().item(), len(expected) - 1


def assert_fits(observed, expected, what):
    """A chi-square test at about 4 sigma (p ~ 3e-5; the quantile by Wilson and Hilferty's approximation)."""
    stat, df = chi_square(observed, expected)
    assert df > 0, f"{what}: too few draws for a test"
    limit = df * (1 - 2 / (9 * df) + 4 * math.sqrt(2 / (9 * df))) ** 3
    assert stat < limit, f"{what}: chi-square {stat:.1f} on {df} degrees of freedom, limit {limit:.1f}"


def test_the_number_of_discs_is_uniform_on_one_to_three():
    n = 30_000
    discs = flatland_world.sample_discs(n, torch.Generator().manual_seed(0))
    observed = torch.bincount((discs[..., 2] > 0).sum(1), minlength=4)[1:]  # scenes with 1, 2, 3 discs
    assert_fits(observed, torch.full((3,), n / 3), "number of discs")
    # the test has the power to see the old sampler's bias (it redrew the count with the scene)
    assert chi_square(n * torch.tensor([0.50, 0.34, 0.16]), torch.full((3,), n / 3))[0] > 1000


def test_the_colours_are_a_uniform_set_of_distinct_palette_colours():
    n, palette = 30_000, torch.tensor(flatland_world.WORLD.palette)
    discs = flatland_world.sample_discs(n, torch.Generator().manual_seed(1))
    K, M = len(palette), flatland_world.WORLD.max_discs
    present = discs[..., 2] > 0  # (n, M)
    index = (discs[..., None, 3:] == palette).all(-1).int().argmax(-1)  # (n, M) each disc's palette colour
    mask = ((2 ** index) * present).sum(1)  # (n,) the scene's colour set as a bit mask
    distinct = torch.stack([(mask >> c) & 1 for c in range(K)]).sum(0) == present.sum(1)
    assert distinct.all()
    sets = [S for N in range(1, M + 1) for S in itertools.combinations(range(K), N)]  # 4 + 6 + 4 colour sets
    observed = [(mask == sum(2 ** c for c in S)).sum() for S in sets]
    assert sum(observed) == n  # nothing else
    expected = [n / M / math.comb(K, len(S)) for S in sets]  # p(S) = p(N) / C(K, N)
    assert_fits(observed, expected, "colour sets")


def test_two_disc_scenes_have_every_pair_of_radii_at_every_distance_at_its_rate():
    """The distribution of (radii, centre distance) of two-disc scenes, against all the valid pairs."""
    cand = flatland_world.candidates()  # (Q, 3)
    d = torch.cdist(cand[:, :2].double(), cand[:, :2].double())  # (Q, Q) centre distances
    valid = d > (cand[:, None, 2] + cand[None, :, 2]).double() + 1e-6  # no overlap; touching counts as overlap

    def cells(i, j):  # candidate pairs -> (number of 0.3 discs, distance in bins of 0.1) as one integer
        return ((cand[i, 2] > 0.25).long() + (cand[j, 2] > 0.25).long()) * 30 + (d[i, j] / 0.1).long()

    exact = torch.bincount(cells(*torch.nonzero(valid, as_tuple=True)), minlength=90).double()
    exact /= exact.sum()  # the prior: uniform over the valid pairs
    discs = flatland_world.sample_discs(30_000, torch.Generator().manual_seed(2))
    pairs = discs[(discs[..., 2] > 0).sum(1) == 2][:, :2, :3]  # (n, 2, 3)
    which = torch.cdist(pairs, cand.expand(len(pairs), -1, -1)).argmin(-1)  # (n, 2) each disc's candidate
    assert torch.allclose(cand[which], pairs)
    observed = torch.bincount(cells(which[:, 0], which[:, 1]), minlength=90)
    assert_fits(observed, len(pairs) * exact, "two-disc scenes by radii and distance")
    # the case the old overlap test (distance against 2 r_i) never produced: radii 0.2 and 0.3, 0.5 to 0.6 apart
    band = 1 * 30 + 5
    assert exact[band] > 0.05 and abs(observed[band] / len(pairs) - exact[band]) < 0.01  # 4 standard deviations


def test_every_non_overlapping_configuration_is_equally_likely():
    """In a small world, enumerate every configuration of N discs: each must occur at the rate
    p(N) / (number of configurations of N discs), which is p(N) / (Z_N / N!)."""
    cand = flatland_world.candidates(SMALL)  # (Q, 3)
    gap = torch.cdist(cand[:, :2].double(), cand[:, :2].double()) - (cand[:, None, 2] + cand[None, :, 2]).double()
    n, M = 90_000, SMALL.max_discs
    discs = flatland_world.sample_discs(n, torch.Generator().manual_seed(3), SMALL)[..., :3]  # (n, M, 3)
    which = torch.cdist(discs, cand.expand(n, -1, -1)).argmin(-1)  # (n, M) each disc's candidate
    present = discs[..., 2] > 0
    assert torch.allclose(cand[which][present], discs[present])
    drawn = Counter(tuple(sorted(w[p].tolist())) for w, p in zip(which, present))
    for N in range(1, M + 1):
        configs = [c for c in itertools.combinations(range(len(cand)), N)
                   if all(gap[a, b] > 1e-6 for a, b in itertools.combinations(c, 2))]  # touching counts as overlap
        assert len(configs) * math.factorial(N) == flatland_world.prior_counts(SMALL)[N - 1]  # Z_N counts tuples
        assert sum(drawn[c] for c in configs) == sum(v for c, v in drawn.items() if len(c) == N)  # nothing else
        assert_fits([drawn[c] for c in configs], torch.full((len(configs),), n / M / len(configs)),
                    f"configurations of {N} discs")


# -----------------------------------------------------------------------------
# The exact posterior


def test_exact_posterior_samples_reproduce_the_context_view_exactly():
    batch = flatland.sample_batch(12, torch.Generator().manual_seed(1), n_ctxt=1)
    params = {k: v[:, 0] for k, v in batch["ctxt_params"].items()}
    for b in range(12):
        samples = flatland_world.posterior_discs(batch["ctxt_obs"][b], {k: v[b:b + 1] for k, v in params.items()},
                                                 64, torch.Generator().manual_seed(b))
        at_b = {k: v[b:b + 1].expand(64, *v.shape[1:]) for k, v in params.items()}
        views = flatland_world.render_discs(samples, at_b)
        assert torch.equal(views, batch["ctxt_obs"][b, 0].expand(64, -1, -1))


def test_one_view_leaves_depth_uncertain_but_the_direction_fixed():
    red = flatland_world.WORLD.palette[0]
    obs = flatland_world.render_discs(one_disc(0.0, 0.0, 0.2, red)[None], context_camera())[:, None]  # (1, 1, 3, W)
    samples = flatland_world.posterior_discs(obs[0], {k: v[0:1] for k, v in context_camera().items()}, 400,
                                             torch.Generator().manual_seed(0))
    red_disc = samples[:, 0]  # visible colour comes first
    assert torch.allclose(red_disc[:, 3:], torch.tensor(red).expand(400, 3))
    assert red_disc[:, 1].std() > 0.1  # depth varies ...
    assert red_disc[:, 0].abs().max() < 0.15  # ... along the central ray
    assert {round(r, 3) for r in red_disc[:, 2].tolist()} == {0.2, 0.3}  # near-and-small or far-and-large
    assert ((samples[:, :, 2] > 0).sum(1) > 1).any()  # a second disc may hide in its shadow (rarely)


def test_a_second_view_narrows_the_posterior_and_both_views_are_reproduced():
    red = flatland_world.WORLD.palette[0]
    truth = one_disc(0.1, 0.2, 0.2, red)[None]
    two = flatland_world.cameras(torch.tensor([flatland_world.CONTEXT_ANGLE, 0.0]))  # from below and from the right
    obs = flatland_world.render_discs(truth.expand(2, -1, -1), two)  # (2, 3, W)
    g = torch.Generator().manual_seed(0)
    one_view = flatland_world.posterior_discs(obs[:1], {k: v[:1] for k, v in two.items()}, 300, g)
    two_views = flatland_world.posterior_discs(obs, two, 300, g)
    for k in range(2):
        params = {n: v[k:k + 1].expand(300, *v.shape[1:]) for n, v in two.items()}
        assert torch.equal(flatland_world.render_discs(two_views, params), obs[k:k + 1].expand(300, -1, -1))
    assert two_views[:, 0, 1].std() < 0.5 * one_view[:, 0, 1].std()  # the depth along the first view's rays


def brute_force_posterior(ctxt_obs, params, world):
    """Enumerate every scene of a tiny prior; keep those that render to the context; weight by the prior."""
    cand, palette = flatland_world.candidates(world), torch.tensor(world.palette)
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
            views = flatland_world.render_discs(discs, {k: v.expand(len(discs), *v.shape[1:])
                                                        for k, v in params.items()}, world)
            for scene in discs[(views == ctxt_obs).all(dim=(1, 2))]:
                probs[scene_key(scene)] = prior
    total = sum(probs.values())
    return {k: v / total for k, v in probs.items()}


def scene_key(scene):
    return tuple(sorted(tuple(round(v, 4) for v in disc) for disc in scene.tolist() if disc[2] > 0))


def test_exact_posterior_agrees_with_brute_force_enumeration_on_a_tiny_world():
    params = context_camera(1, TINY)
    g = torch.Generator().manual_seed(3)
    truth = flatland_world.sample_discs(1, g, TINY)
    ctxt_obs = flatland_world.render_discs(truth, params, TINY)  # (1, 3, W)
    expected = brute_force_posterior(ctxt_obs, params, TINY)
    assert len(expected) >= 10  # an ambiguous view: many scenes explain it
    n = 20_000
    samples = flatland_world.posterior_discs(ctxt_obs, params, n, g, TINY)
    counts = Counter(scene_key(s) for s in samples)
    assert set(counts) <= set(expected)  # every sample explains the view
    total_variation = 0.5 * sum(abs(counts[k] / n - p) for k, p in expected.items())
    assert total_variation < 0.04


def test_posterior_of_a_one_disc_view_agrees_with_rejection_sampling_from_the_sampler():
    """The posterior that posterior_sets counts is that of the data: keep the sampler's scenes that
    render to the view, and compare their frequencies with the exact probabilities, scene by scene."""
    params = context_camera(1, SMALL)
    obs = flatland_world.render_discs(one_disc(-0.55 / 3, -0.55, 0.45, SMALL.palette[0])[None], params, SMALL)
    probs, counts, _, _ = flatland_world.posterior_sets(obs, params, SMALL)
    assert sum(p for S, p in probs.items() if len(S) > 1) > 0.5  # other discs may hide behind the big near one
    n = 400_000
    discs = flatland_world.sample_discs(n, torch.Generator().manual_seed(4), SMALL)
    views = flatland_world.render_discs(discs, {k: v.expand(n, *v.shape[1:]) for k, v in params.items()}, SMALL)
    kept = Counter(scene_key(s) for s in discs[(views == obs).all(dim=(1, 2))])
    assert sum(kept.values()) > 2000
    palette = [tuple(round(v, 4) for v in c) for c in SMALL.palette]

    def p_exact(key):  # the counts[S] scenes with colour set S that explain the view are equally likely
        S = tuple(sorted(palette.index(disc[3:]) for disc in key))
        return probs[S] / counts[S]

    scenes = brute_force_posterior(obs, params, SMALL)  # every scene that renders to the view
    assert len(scenes) == sum(counts.values()) and set(kept) <= set(scenes)
    n_kept = sum(kept.values())
    assert_fits([kept[key] for key in scenes], [n_kept * p_exact(key) for key in scenes],
                "scenes that render to the view")
    p_many = sum(v for key, v in kept.items() if len(key) > 1) / n_kept
    assert abs(p_many - sum(p for S, p in probs.items() if len(S) > 1)) < 0.04  # 4 standard deviations


def test_sampling_given_a_colour_set_reaches_exactly_the_counted_scenes():
    params = context_camera(1, SMALL)
    obs = flatland_world.render_discs(one_disc(-0.55 / 3, -0.55, 0.45, SMALL.palette[0])[None], params, SMALL)
    probs, counts, idx, A = flatland_world.posterior_sets(obs, params, SMALL)
    g = torch.Generator().manual_seed(5)
    for S in probs:
        discs = flatland_world.sample_given_set(S, 2000, idx, A, g, SMALL)
        views = flatland_world.render_discs(discs, {k: v.expand(2000, *v.shape[1:]) for k, v in params.items()}, SMALL)
        assert torch.equal(views, obs.expand(2000, -1, -1))
        assert len({scene_key(s) for s in discs}) == counts[S]


# -----------------------------------------------------------------------------
# The learned problem


def test_training_examples_have_one_to_three_context_views_the_first_from_the_context_camera():
    counts = Counter()
    for seed in range(60):
        batch = flatland.sample_batch(2, torch.Generator().manual_seed(seed))
        n_ctxt = batch["ctxt_obs"].shape[1]
        counts[n_ctxt] += 1
        first = batch["ctxt_params"]["c2w"][:, 0, :2, 2]  # (B, 2) the first context camera's position
        assert torch.allclose(torch.atan2(first[:, 1], first[:, 0]),
                              torch.full((2,), flatland_world.CONTEXT_ANGLE), atol=1e-5)
    assert set(counts) == {1, 2, 3} and min(counts.values()) >= 10  # each count about a third of the time


def test_volume_rendered_raster_matches_the_exact_view():
    batch = flatland.sample_batch(32, torch.Generator().manual_seed(2), n_ctxt=1)
    obs = flatland.forward(batch["signal"], batch["trgt_params"])
    assert obs.shape == batch["trgt_obs"].shape == (32, 3, flatland_world.WORLD.n_pixels)
    assert (obs - batch["trgt_obs"]).abs().mean() < 0.05  # only pixels at disc edges differ


def test_lift_gives_each_cell_the_pixel_it_projects_to():
    """Worked out by hand for cameras on the circle: a cell at depth z and sideways offset x from the
    camera lands at u = 1/2 + f x / z, f = 1 / (2 tan 35 deg); its colour is the image there, linearly
    interpolated between the two nearest pixel centres (u = (i + 1/2) / W)."""
    W, G = flatland_world.WORLD.n_pixels, flatland.GRID
    angles = torch.tensor([flatland_world.CONTEXT_ANGLE, 0.4, 2.5])  # (V,)
    params = {k: v[None] for k, v in flatland_world.cameras(angles).items()}  # (1, V, ...)
    obs = torch.rand(1, 3, 3, W, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (1, V, 3, W) random pixels
    lifted = flatland.lift(obs, params)[0]  # (V, 6, G, G)
    coords = -1 + (torch.arange(G) + 0.5) * 2 / G
    focal = 0.5 / math.tan(math.radians(flatland_world.WORLD.half_fov_deg))
    for v, angle in enumerate(angles.tolist()):
        eye = flatland_world.WORLD.cam_dist * torch.tensor([math.cos(angle), math.sin(angle)])
        ahead, right = -eye / eye.norm(), torch.tensor([-math.sin(angle), math.cos(angle)])
        for row, col in [(3, 5), (16, 16), (20, 9), (30, 27), (0, 31), (11, 24)]:
            offset = torch.stack([coords[col], coords[row]]) - eye  # row = y, column = x
            z, x = (offset @ ahead).item(), (offset @ right).item()
            u = 0.5 + focal * x / z
            seen = 0 <= u <= 1
            s = u * W - 0.5  # in pixel units: pixel i's centre is at s = i
            i, w = math.floor(s), s - math.floor(s)
            pixel = lambda k: obs[0, v, :, k] if 0 <= k < W else torch.zeros(3)  # zero beyond the image
            colour = ((1 - w) * pixel(i) + w * pixel(i + 1)) if seen else torch.zeros(3)
            assert torch.allclose(lifted[v, :3, row, col], colour, atol=1e-5), (v, row, col)
            assert lifted[v, 3, row, col] == float(seen)
            assert lifted[v, 4, row, col].item() == pytest.approx(2 * min(max(u, 0), 1) - 1, abs=1e-5)
            assert lifted[v, 5, row, col].item() == pytest.approx(z - flatland_world.WORLD.cam_dist, abs=1e-5)
    assert (lifted[:, 3] == 1).all()  # the field of view takes in the whole square from anywhere on the circle


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


def test_views_in_turn_sample_the_target_then_views_around_the_ring_each_added_to_the_context(monkeypatch):
    model = dfm.make_model("dfm", flatland.make_denoiser("dfm"), flatland.forward)
    batch = flatland.held_out_batch(2)
    seen, original = [], model.sample

    def sample(ctxt_obs, ctxt_params, trgt_params, **kwargs):  # records what each view in turn is conditioned on
        seen.append((ctxt_obs.shape[1], trgt_params["c2w"][:, :2, 2]))
        return original(ctxt_obs, ctxt_params, trgt_params, **kwargs)

    monkeypatch.setattr(model, "sample", sample)
    signals = flatland.draw_samples(model, batch, 3, torch.Generator().manual_seed(0), steps=2, views_in_turn=3)
    assert signals.shape == (2, 3, *flatland.SIGNAL_SHAPE)
    assert [n_ctxt for n_ctxt, _ in seen] == [1, 2, 3, 4]  # each sampled view joins the context of the next
    assert torch.equal(seen[0][1], batch["trgt_params"]["c2w"].repeat_interleave(3, 0)[:, :2, 2])  # the target first
    angles = torch.stack([torch.atan2(pos[:, 1], pos[:, 0]) for _, pos in seen[1:]])  # (3, B * n)
    offsets = torch.remainder(angles - flatland_world.CONTEXT_ANGLE, 2 * math.pi)
    assert torch.allclose(offsets, torch.tensor([0.5, 1.0, 1.5])[:, None] * math.pi, atol=1e-5)  # around the ring


def test_views_in_turn_change_dfms_samples_and_neither_the_oracles_nor_the_deterministic_models():
    torch.manual_seed(0)
    batch = flatland.held_out_batch(2)
    for kind in ("dfm", "oracle", "deterministic"):
        model = dfm.make_model(kind, flatland.make_denoiser(kind), flatland.forward)
        draw = lambda k: flatland.draw_samples(model, batch, 2, torch.Generator().manual_seed(0), 2, views_in_turn=k)
        assert torch.equal(draw(2), draw(2))  # the same seed, the same scenes
        assert torch.equal(draw(0), draw(2)) == (kind != "dfm")  # the others: the scene at once


def test_an_untrained_model_scores_far_above_the_floor_and_pictures_are_written(tmp_path):
    torch.manual_seed(0)
    model = dfm.make_model("dfm", flatland.make_denoiser("dfm"), flatland.forward)  # untrained: grey fog
    scores = flatland.evaluate(model, n_contexts=3, n_samples=16, steps=2)
    assert set(scores) == {"views", "views_floor", "position", "position_floor", "psnr", "psnr_exact",
                           "spread", "spread_exact"}
    assert scores["views"] > 5 * scores["views_floor"] and scores["position"] > 3 * scores["position_floor"]
    assert scores["psnr_exact"] > scores["psnr"]
    assert scores["spread"] < 0.5 * scores["spread_exact"]  # grey fog: every sample looks alike
    flatland.plot(model, tmp_path / "flatland.png", n_contexts=2, n_samples=2, steps=2)
    flatland.animate(model, tmp_path / "flatland.gif", n_frames=4, steps=2)
    assert (tmp_path / "flatland.png").stat().st_size > 0 and (tmp_path / "flatland.gif").stat().st_size > 0


def test_flatland_notebook_runs_top_to_bottom(run_notebook):
    notebook = run_notebook("flatland.ipynb")
    bars = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []) if o.get("name") == "stderr")
    assert all(f"flatland/{kind}: 100%" in bars for kind in ("dfm", "deterministic"))  # training shows its progress


def test_psnr_of_identical_observations_is_finite():
    """Seen with 1 context and 2 samples: every exact sample was the true scene, and psnr divided by zero."""
    x = torch.rand(2, 3, 16)
    assert math.isfinite(flatland.psnr(x, x)) and flatland.psnr(x, x) > 100
    assert flatland.psnr(x, x + 0.1) < flatland.psnr(x, x)
