"""The two-tone sphere world: cameras, the exact ray caster, the prior, the exact posterior and the scores."""
import math

import pytest
import torch

import render
from toy_problems import scenes3d_world as w


def generator(seed):
    return torch.Generator().manual_seed(seed)


def one_camera(params, i):
    return {k: v[i] for k, v in params.items()}


def project(params, points):
    """World points (P, 3) -> image points (P, 2) in [0, 1]^2 if in view, and their depths (P,)."""
    w2c = torch.linalg.inv(params["c2w"])
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]  # (P, 3) in the camera frame
    pix = cam @ params["K"].T
    return pix[:, :2] / pix[:, 2:], cam[:, 2]


def assert_uniform(labels, n_cells):
    """Chi-square test of integer labels (N,) against the uniform distribution on 0..n_cells-1, at about 5 sigma."""
    counts = torch.bincount(labels.flatten(), minlength=n_cells).double()
    assert len(counts) == n_cells
    expected = counts.sum() / n_cells
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    df = n_cells - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, counts.tolist())


def index_of(values, table):
    """Position of each value in a sorted table of distinct floats: (...,) -> (...,) long."""
    return (values[..., None] - torch.as_tensor(table)).abs().argmin(-1)


# -----------------------------------------------------------------------------
# Cameras and the renderer


def test_cameras_look_at_their_target_with_opencv_axes():
    params = w.cameras(torch.tensor([w.CONTEXT_AZIMUTH, 0.3, 2.0, 4.0]), torch.tensor([0.5, 0.45, 0.6, 0.52]))
    target = torch.tensor([w.WORLD.target])
    for i in range(4):
        cam = one_camera(params, i)
        assert torch.allclose((cam["c2w"][:3, 3] - target[0]).norm(), torch.tensor(w.WORLD.cam_dist))
        uv, depth = project(cam, target)
        assert torch.allclose(uv, torch.tensor([[0.5, 0.5]]), atol=1e-5) and depth > 0  # the target is at the centre
        uv, _ = project(cam, target + torch.tensor([[0.0, 0.0, 0.2]]))
        assert uv[0, 1] < 0.5 - 0.01  # world up appears higher in the image: OpenCV's y points down
    ctxt = w.context_camera()  # sits on the -y side, so the world's +x is to its right
    uv, _ = project(ctxt, target + torch.tensor([[0.2, 0.0, 0.0]]))
    assert uv[0, 0] > 0.5 + 0.01
    assert ctxt["c2w"][1, 3] < 0 and ctxt["c2w"][0, 3].abs() < 1e-6
    elevation = torch.asin((ctxt["c2w"][2, 3] - target[0, 2]) / w.WORLD.cam_dist)
    assert math.isclose(math.degrees(elevation), w.WORLD.elevation_deg, abs_tol=1e-4)
    assert torch.allclose(w.orbit_cameras(12)["c2w"][0], ctxt["c2w"], atol=1e-6)  # the orbit starts at the context


def test_everything_visible_is_inside_the_scene_box_and_in_view():
    lo, hi = (torch.tensor(corner) for corner in w.SCENE_BOX)
    corners = torch.tensor([[x, y, 0.0] for x in (-1, 1) for y in (-1, 1)])  # the ground square
    for world in (w.WORLD, w.WORLD2):
        top = 2 * max(world.radii)  # the highest point of any sphere; the lattice keeps them over the square
        assert torch.all(lo <= corners) and torch.all(corners <= hi) and hi[2] >= top and lo[2] < 0
        params = w.orbit_cameras(24, world)
        for i in range(24):
            uv, depth = project(one_camera(params, i), corners)
            assert torch.all((uv > 0) & (uv < 1)) and torch.all(depth > 0), i
        scenes = w.sample_scenes(64, generator(0), world)
        for i in range(0, 24, 4):  # no sphere is cut by the image border
            parts = w.render_parts(scenes, one_camera(params, i), world)
            border = torch.cat([parts[:, 0], parts[:, -1], parts[:, :, 0], parts[:, :, -1]], dim=1)
            assert torch.all(border == -1)


def test_rays_hit_what_they_should_with_lambert_shading():
    world = w.WORLD
    red, blue = 0, 2
    xy, r = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[0.5]])
    scenes = w.make_scenes(xy, r, torch.tensor([[red]]), torch.tensor([[blue]]), world)  # (1, 1, ...)
    origins = torch.tensor([[[0.0, 0.0, 5.0], [0.8, 0.8, 5.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.5], [0.0, 0.0, 0.5]]])
    dirs = torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]])
    out = w.trace(scenes, origins, dirs, world)
    light = torch.tensor(world.light) / torch.tensor(world.light).norm()
    lit_from_above = world.ambient + (1 - world.ambient) * light[2]  # shading of a normal pointing up
    # 0: straight down onto the sphere's top, which faces the context camera (it sits above the horizon)
    assert out["part"][0, 0] == 1 and math.isclose(out["depth"][0, 0].item(), 5 - 2 * 0.5, abs_tol=1e-5)
    assert torch.allclose(out["rgb"][0, 0], torch.tensor(world.palette[red]) * lit_from_above)
    # 1: beside the sphere, down onto the ground square
    assert out["part"][0, 1] == 0 and math.isclose(out["depth"][0, 1].item(), 5.0, abs_tol=1e-5)
    assert torch.allclose(out["rgb"][0, 1], torch.tensor(world.ground) * lit_from_above)
    # 2: up into the sky
    assert out["part"][0, 2] == -1 and math.isinf(out["depth"][0, 2]) and torch.all(out["rgb"][0, 2] == 0)
    # 3: horizontally from the far side (+y) at the centre's height: the back half, in the back colour
    assert out["part"][0, 3] == 2 and math.isclose(out["depth"][0, 3].item(), 5 - 0.5, abs_tol=1e-5)
    shade = world.ambient + (1 - world.ambient) * max(0.0, light[1].item())  # its normal is +y
    assert torch.allclose(out["rgb"][0, 3], torch.tensor(world.palette[blue]) * shade)
    # 4: from inside the sphere the near hit is behind the origin: the ray passes through to the ground
    assert out["part"][0, 4] == 0


def test_rendering_image_points_equals_the_full_render_at_those_pixels():
    scenes = w.sample_scenes(6, generator(1), w.WORLD)
    params = w.cameras(torch.rand(6, generator=generator(2)) * 2 * math.pi)  # (B, ...) one camera per scene
    full = w.render_scenes(scenes, params).flatten(2)  # (B, 3, H*W)
    assert full.shape == (6, 3, 32 * 32) and full.min() >= -1 and full.max() <= 1
    idx = torch.randint(32 * 32, (6, 50), generator=generator(3))  # (B, P) random pixels per scene
    uv = render.pixel_centers(32, 32)[idx]  # (B, P, 2)
    assert torch.allclose(w.render_scenes(scenes, params, uv=uv), full.gather(2, idx[:, None].expand(-1, 3, -1)),
                          atol=1e-5)
    patch = torch.arange(100, 120)  # the same points for every scene, as (P, 2)
    assert torch.allclose(w.render_scenes(scenes, params, uv=render.pixel_centers(32, 32)[patch]),
                          full[..., patch], atol=1e-5)


# -----------------------------------------------------------------------------
# The prior


def test_prior_draws_position_radius_and_both_colours_uniformly_and_independently():
    world, N = w.WORLD, 20000
    s = w.sample_scenes(N, generator(0), world)
    K, L = len(world.palette), world.lattice
    side = w.slot_positions(world)[0][:, 0].unique()
    ix, iy = index_of(s["center"][:, 0, 0], side), index_of(s["center"][:, 0, 1], side)
    ir = index_of(s["radius"][:, 0], world.radii)
    assert_uniform(s["front"], K)
    assert_uniform(s["back"], K)
    assert_uniform(s["front"] * K + s["back"], K * K)  # independent of each other
    assert_uniform(ix * L + iy, L * L)  # every lattice point equally likely
    assert_uniform(ir, len(world.radii))
    assert_uniform((ix * L + iy) * len(world.radii) + ir, L * L * len(world.radii))  # radius independent of position
    assert_uniform(ir * K + s["front"][:, 0], len(world.radii) * K)  # colour independent of geometry
    assert torch.equal(s["center"][..., 2], s["radius"])  # resting on the ground
    assert torch.all(s["center"][..., :2].abs() + s["radius"][..., None] <= 1 + 1e-6)  # over the ground square
    eye = w.context_camera()["c2w"][:3, 3]
    assert torch.allclose(s["normal"], torch.nn.functional.normalize(eye - s["center"], dim=-1))


def test_two_spheres_sit_in_their_own_halves_independently_and_never_meet():
    world = w.WORLD2
    s = w.sample_scenes(20000, generator(1), world)
    x, r = s["center"][..., 0], s["radius"]  # (N, 2)
    assert torch.all(x[:, 0] + r[:, 0] <= -world.gap + 1e-6) and torch.all(x[:, 1] - r[:, 1] >= world.gap - 1e-6)
    assert torch.all(s["center"][..., :2].abs() + r[..., None] <= 1 + 1e-6)
    slots = w.slot_positions(world)
    where = [((s["center"][:, m, None, :2] - slots[m]).abs().sum(-1)).argmin(-1) for m in range(2)]  # (N,) each
    P = len(slots[0])
    assert_uniform(where[0] * P + where[1], P * P)  # the two positions are independent and uniform
    assert_uniform(s["front"][:, 0] * 4 + s["front"][:, 1], 16)
    # the plane x = 0 holds the context camera and separates the spheres: each has its own half of the image
    parts = w.render_parts({k: v[:200] for k, v in s.items()}, w.context_camera(world), world)  # (200, H, W)
    half = world.size // 2
    assert torch.all(parts[..., :half] < 3) and torch.all((parts[..., half:] < 1) | (parts[..., half:] > 2))
    assert torch.all((parts == 1).flatten(1).any(1)) and torch.all((parts == 3).flatten(1).any(1))


def test_the_context_camera_never_sees_a_back_half():
    for world, n in ((w.WORLD, 2000), (w.WORLD2, 300)):
        scenes = w.sample_scenes(n, generator(4), world)
        parts = w.render_parts(scenes, w.context_camera(world), world)  # (n, H, W)
        fronts = torch.stack([(parts == 1 + 2 * m).flatten(1).sum(1) for m in range(world.n_spheres)], 1)
        assert torch.all(fronts >= 4)  # every front half is in view ...
        back = (parts > 0) & (parts % 2 == 0)  # labels 2 + 2m
        assert not back.any()  # ... and not a single pixel of any back half


def test_back_halves_are_in_view_from_the_far_side_cameras():
    for world, n in ((w.WORLD, 500), (w.WORLD2, 100)):
        scenes = w.sample_scenes(n, generator(5), world)
        far = w.far_side_cameras(world)
        for v in range(len(w.FAR_SIDE_DEG)):
            parts = w.render_parts(scenes, one_camera(far, v), world)
            for m in range(world.n_spheres):
                kept = w.erode(parts == 2 + 2 * m).flatten(1).sum(1)  # (n,) pixels that back_colour_scores uses
                assert kept.min() >= 3, (world.n_spheres, v, m, kept.min())


# -----------------------------------------------------------------------------
# The exact posterior


def test_every_candidate_sphere_looks_different_from_the_context_camera():
    """So one context view pins down position, radius and front colour: the posterior's geometry is a point."""
    for world in (w.WORLD, w.WORLD2):
        for m in range(world.n_spheres):
            cand = w.slot_candidates(m, world)
            views = w.render_scenes(cand, w.context_camera(world), world).flatten(1)  # (Q, 3*H*W)
            gaps = torch.cdist(views, views, p=math.inf) + 10 * torch.eye(len(views))
            assert gaps.min() > 0.5  # far above exact_posterior_scenes' tolerance of 0.02


def test_exact_posterior_recovers_geometry_and_front_and_draws_backs_uniformly():
    backs = []
    for world, B, n in ((w.WORLD, 16, 256), (w.WORLD2, 4, 500)):
        truth = w.sample_scenes(B, generator(1_000_003), world)  # held out: a seed the other tests do not use
        ctxt = w.render_scenes(truth, w.context_camera(world), world)  # (B, 3, H, W)
        post = w.exact_posterior_scenes(ctxt, n, generator(7), world)  # leading (B, n)
        assert post["center"].shape == (B, n, world.n_spheres, 3) and post["back"].shape == (B, n, world.n_spheres)
        for key in ("center", "radius", "front", "normal"):
            assert torch.equal(post[key], truth[key][:, None].expand_as(post[key])), key
        flat = {k: v[:, :4].flatten(0, 1) for k, v in post.items()}  # (B*4, ...): samples reproduce the context
        again = w.render_scenes(flat, w.context_camera(world), world).unflatten(0, (B, 4))
        assert torch.allclose(again, ctxt[:, None].expand_as(again), atol=1e-5)
        backs.append(post["back"])
    one, two = backs  # (16, 256, 1), (4, 500, 2)
    assert_uniform(one + 4 * torch.arange(16)[:, None, None], 64)  # uniform in every context
    assert_uniform(two[..., 0] * 4 + two[..., 1], 16)  # the two backs are independent


def test_exact_posterior_refuses_a_context_that_no_scene_of_the_prior_renders():
    world = w.WORLD
    off_lattice = w.make_scenes(torch.tensor([[[0.1, 0.0]]]), torch.tensor([[0.4]]), torch.tensor([[0]]),
                                torch.tensor([[0]]), world)
    odd_colour = w.World(palette=((0.5, 0.2, 0.9),) * 4)  # same geometry, a colour not in the palette
    on_lattice = w.make_scenes(torch.tensor([[[0.25, 0.0]]]), torch.tensor([[0.4]]), torch.tensor([[0]]),
                               torch.tensor([[0]]), world)
    for ctxt in (w.render_scenes(off_lattice, w.context_camera(world), world),
                 w.render_scenes(on_lattice, w.context_camera(world), odd_colour),
                 torch.rand(1, 3, 32, 32, generator=generator(0)) * 2 - 1):
        with pytest.raises(ValueError, match="no scene of the prior"):
            w.exact_posterior_scenes(ctxt, 4, generator(0), world)


# -----------------------------------------------------------------------------
# Scoring the hidden half


@pytest.fixture(scope="module")
def far_side_renders():
    """16 held-out contexts, 32 exact posterior samples each, rendered from straight behind."""
    world, B, n = w.WORLD, 16, 32
    truth = w.sample_scenes(B, generator(1_000_004), world)
    post = w.exact_posterior_scenes(w.render_scenes(truth, w.context_camera(world), world), n, generator(9), world)
    far = one_camera(w.far_side_cameras(world), 0)
    obs = w.render_scenes({k: v.flatten(0, 1) for k, v in post.items()}, far, world).unflatten(0, (B, n))
    return truth, far, obs


def test_exact_samples_score_at_the_floor_and_are_sharp(far_side_renders):
    truth, far, obs = far_side_renders
    scores = w.back_colour_scores(obs, truth, far)
    floor = w.hidden_floor(32, 16, generator(0), 4)
    assert 0.08 < floor < 0.16  # E[tv] of 32 uniform draws over 4 colours
    assert abs(scores["tv"] - floor) < 0.05 and scores["sharp"] == 1.0
    assert scores["histogram"].shape == (16, 4) and torch.allclose(scores["histogram"].sum(-1), torch.ones(16))
    assert scores["valid"].all() and scores["rmse"].max() < 1e-4


def test_one_colour_always_scores_tv_075_and_the_average_colour_is_never_sharp(far_side_renders):
    truth, far, obs = far_side_renders
    always_red = w.render_scenes(w.with_back_colours(truth, 0), far)[:, None].expand_as(obs)  # (B, n, 3, H, W)
    scores = w.back_colour_scores(always_red, truth, far)
    assert math.isclose(scores["tv"], 0.75, abs_tol=1e-6) and scores["sharp"] == 1.0  # 1/2 (3/4 + 3 x 1/4)
    # Shading is linear in the albedo, so the mean of the palette renders is the render in the mean colour.
    mean_colour = torch.stack([w.render_scenes(w.with_back_colours(truth, k), far) for k in range(4)]).mean(0)
    scores = w.back_colour_scores(mean_colour[:, None].expand_as(obs), truth, far)
    assert scores["sharp"] == 0.0 and scores["rmse"].min() > 2 * w.SHARP_RMSE


def test_hidden_floor_with_one_sample_is_three_quarters_and_shrinks_with_more():
    assert math.isclose(w.hidden_floor(1, 8, generator(0), 4), 0.75)  # one draw: all mass on one of 4 colours
    floors = [w.hidden_floor(n, 16, generator(0), 4) for n in (8, 32, 128)]
    assert floors[0] > floors[1] > floors[2] > 0
