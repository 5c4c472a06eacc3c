"""render.py against cases with a closed-form answer, in 2D and in 3D."""
import math

import pytest
import torch

import render


def camera_at_origin(D, focal=1.0):
    """Identity pose (camera at the origin looking along +z) with principal point at the image centre."""
    K = torch.eye(D)
    K[:-1, :-1] *= focal
    K[:-1, -1] = 0.5
    return torch.eye(D + 1), K


def ball_field(center, radius, sigma, color=(0.2, 0.4, 0.8)):
    """A ball (a disc in 2D) of constant density: points (..., D) -> sigma (...), rgb (..., 3)."""
    center, color = torch.tensor(center), torch.tensor(color)

    def field(points):
        inside = ((points - center).norm(dim=-1) < radius).float()
        return sigma * inside, color.expand(*points.shape[:-1], 3)
    return field


def test_rays_follow_opencv_axes_in_2d_and_3d():
    c2w, K = camera_at_origin(3, focal=2.0)
    _, dirs = render.get_rays(c2w, K, torch.tensor([[0.5, 0.5], [1.0, 0.5], [0.5, 1.0]]))
    assert torch.allclose(dirs[0], torch.tensor([0.0, 0.0, 1.0]))  # the principal point looks along +z
    assert dirs[1, 0] > 0 and dirs[2, 1] > 0  # right in the image is +x, down is +y
    assert torch.allclose(dirs[1], torch.tensor([0.25, 0.0, 1.0]) / math.hypot(0.25, 1.0))  # x/z = (u - cx) / f

    c2w, K = camera_at_origin(2, focal=2.0)
    c2w[:2, 2] = torch.tensor([1.0, -3.0])  # move the camera; directions do not change
    origins, dirs = render.get_rays(c2w, K, render.pixel_centers(4))
    assert origins.shape == dirs.shape == (4, 2)
    assert torch.allclose(origins, torch.tensor([1.0, -3.0]).expand(4, 2))
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(4))
    assert (dirs[1:, 0] > dirs[:-1, 0]).all()  # pixels run left to right along +x


def test_pixel_centers_are_row_major_with_u_first():
    uv = render.pixel_centers(2, 4)  # H = 2, W = 4
    assert uv.shape == (8, 2)
    assert torch.allclose(uv[1], torch.tensor([0.375, 0.25]))  # second pixel of the first row
    assert torch.allclose(uv[4], torch.tensor([0.125, 0.75]))  # first pixel of the second row


@pytest.mark.parametrize("sigma", [0.5, 3.0])
def test_constant_slab_matches_closed_form_transmittance_and_depth(sigma):
    # A slab of density sigma for a <= z <= b, seen along the optical axis from near = 0 to far = 10.
    a, b, far, color = 2.0, 5.0, 10.0, torch.tensor([1.0, 0.5, 0.0])

    def field(points):
        inside = ((points[..., 2] >= a) & (points[..., 2] < b)).float()
        return sigma * inside, color.expand(*points.shape[:-1], 3)

    origins, dirs = torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 1.0]])
    out = render.render_rays(field, origins, dirs, torch.zeros(1), torch.full((1,), far), n_samples=2000,
                             background=0.3)
    L = b - a
    opacity = 1 - math.exp(-sigma * L)
    # E[stop] = int_a^b t sigma e^{-sigma (t - a)} dt + e^{-sigma L} far
    depth = a * opacity + (1 - math.exp(-sigma * L)) / sigma - L * math.exp(-sigma * L) + math.exp(-sigma * L) * far
    assert out["opacity"].item() == pytest.approx(opacity, abs=2e-3)
    assert out["depth"].item() == pytest.approx(depth, abs=2e-2)
    assert torch.allclose(out["rgb"][0], opacity * color + (1 - opacity) * 0.3, atol=2e-3)
    assert out["weights"].sum().item() == pytest.approx(out["opacity"].item(), abs=1e-6)


@pytest.mark.parametrize("D", [2, 3])
def test_ball_opacity_follows_chord_length_in_2d_and_3d(D):
    # The same functions render a disc (2D) and a ball (3D): opacity = 1 - exp(-sigma * chord).
    r, dist, sigma = 1.0, 4.0, 0.8
    c2w, K = camera_at_origin(D)
    uv = torch.full((5, D - 1), 0.5)
    uv[:, 0] = torch.tensor([0.5, 0.52, 0.55, 0.6, 0.9])  # from the centre to a ray that misses the ball
    origins, dirs = render.get_rays(c2w, K, uv)
    center = [0.0] * (D - 1) + [dist]
    out = render.render_rays(ball_field(center, r, sigma), origins, dirs, torch.zeros(5), torch.full((5,), 8.0),
                             n_samples=4000)
    offset = dist * dirs[:, 0] / dirs.norm(dim=-1)  # distance from the ball's centre to each ray
    chord = 2 * (r ** 2 - offset ** 2).clamp(min=0).sqrt()
    assert torch.allclose(out["opacity"], 1 - torch.exp(-sigma * chord), atol=3e-3)
    assert out["opacity"][-1] == 0  # the last ray passes beside the ball


def test_opaque_disc_depth_is_distance_to_its_surface():
    out = render.render_rays(ball_field([0.0, 3.0], 1.0, 1e4), torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]),
                             torch.zeros(1), torch.full((1,), 6.0), n_samples=600)
    assert out["opacity"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["depth"].item() == pytest.approx(2.0, abs=0.02)  # the near surface, 3 - 1


def test_empty_space_gives_background():
    background = torch.tensor([0.1, 0.2, 0.3])
    origins, dirs = render.get_rays(*camera_at_origin(3), render.pixel_centers(4, 4))
    near, far = torch.full((16,), 0.5), torch.full((16,), 5.0)
    out = render.render_rays(ball_field([0.0, 0.0, 0.0], 1.0, 0.0), origins, dirs, near, far, n_samples=32,
                             background=background)
    assert torch.allclose(out["rgb"], background.expand(16, 3))
    assert torch.all(out["opacity"] == 0) and torch.allclose(out["depth"], far)


def test_rays_that_miss_the_box_render_background_and_hits_get_the_right_interval():
    origins = torch.tensor([[-3.0, 0.0], [-3.0, 5.0], [0.0, 0.0]])
    dirs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # through, beside, from inside
    near, far = render.intersect_box(origins, dirs, -1.0, 1.0)
    assert torch.allclose(near, torch.tensor([2.0, near[1].item(), 0.0]))
    assert torch.allclose(far, torch.tensor([4.0, near[1].item(), 1.0]))
    assert far[1] == near[1]  # the miss gets an empty interval
    full = lambda p: (torch.full(p.shape[:-1], 100.0), torch.ones(*p.shape[:-1], 3))  # an opaque white box
    out = render.render_rays(full, origins, dirs, near, far, n_samples=16, background=0.0)
    assert torch.allclose(out["opacity"], torch.tensor([1.0, 0.0, 1.0]), atol=1e-4)
    assert torch.all(out["rgb"][1] == 0)


@pytest.mark.parametrize("sigma", [0.0, 1e10])
def test_gradients_are_finite_for_zero_and_huge_density(sigma):
    density = torch.tensor(sigma, requires_grad=True)
    color = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    field = lambda p: (density * torch.ones(p.shape[:-1]), color.expand(*p.shape[:-1], 3))
    origins, dirs = render.get_rays(*camera_at_origin(2), render.pixel_centers(8))
    out = render.render_rays(field, origins, dirs, torch.full((8,), 1.0), torch.full((8,), 3.0), n_samples=16,
                             n_importance=16)
    (out["rgb"].sum() + out["depth"].sum() + out["opacity"].sum()).backward()
    assert torch.isfinite(density.grad) and torch.isfinite(color.grad).all()
    assert torch.isfinite(out["depth"]).all()


def test_jitter_stays_inside_bins_and_evaluation_is_deterministic():
    near, far = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    t_eval = render.sample_along_rays(near, far, 4)
    assert torch.allclose(t_eval[1], torch.tensor([2.0, 3.0, 4.0, 5.0]))  # bin starts
    t = render.sample_along_rays(near, far, 4, perturb=True, generator=torch.Generator().manual_seed(0))
    assert torch.all(t >= t_eval) and torch.all(t < t_eval + ((far - near) / 4)[:, None])
    assert not torch.equal(t, t_eval)


def test_importance_samples_land_where_the_weights_are():
    bins = torch.linspace(0, 4, 5).expand(2, 5)  # bins [0,1), [1,2), [2,3), [3,4)
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    t = render.sample_pdf(bins, weights, 200, perturb=True, generator=torch.Generator().manual_seed(0))
    assert ((t[0] >= 2) & (t[0] <= 3)).float().mean() > 0.99
    assert ((t[1] >= 0) & (t[1] <= 2)).float().mean() > 0.99
    assert (t[1] < 1).float().mean() == pytest.approx(0.5, abs=0.1)


def test_hierarchical_sampling_finds_a_thin_wall_that_coarse_sampling_blurs():
    # A wall 0.05 thick at z = 3.03: 16 coarse samples over [0, 8] barely see it; 64 importance samples do.
    field = lambda p: (((p[..., 2] > 3.03) & (p[..., 2] < 3.08)).float() * 200.0, torch.ones(*p.shape[:-1], 3))
    args = (field, torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1), torch.full((1,), 8.0))
    coarse = render.render_rays(*args, n_samples=16, perturb=True, generator=torch.Generator().manual_seed(1))
    fine = render.render_rays(*args, n_samples=16, n_importance=64, perturb=True,
                              generator=torch.Generator().manual_seed(1))
    truth = 1 - math.exp(-200 * 0.05)
    assert abs(fine["opacity"].item() - truth) < abs(coarse["opacity"].item() - truth)
    assert fine["t"].shape == (1, 80) and "coarse" in fine


# -- projection and the pixel-aligned lookup -----------------------------------------------------


def random_pose(D, generator):
    """A random rotation (via QR, det +1) and position: (D+1, D+1)."""
    q, r = torch.linalg.qr(torch.randn(D, D, generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    c2w = torch.eye(D + 1)
    c2w[:D, :D], c2w[:D, D] = q, torch.randn(D, generator=generator)
    return c2w


@pytest.mark.parametrize("D", [2, 3])
def test_a_point_on_a_pixel_ray_projects_back_to_that_pixel(D):
    g = torch.Generator().manual_seed(0)
    c2w, K = random_pose(D, g), camera_at_origin(D, focal=1.3)[1]
    uv = torch.rand(10, D - 1, generator=g)  # (P, D-1) anywhere in the image
    origins, dirs = render.get_rays(c2w, K, uv)
    dist = 0.5 + 3 * torch.rand(10, generator=g)  # distances along the rays
    back, depth = render.project(origins + dist[:, None] * dirs, c2w, K)
    assert torch.allclose(back, uv, atol=1e-5)
    z = dirs @ c2w[:D, D - 1]  # cosine between each ray and the camera's forward axis
    assert torch.allclose(depth, dist * z, atol=1e-5)


@pytest.mark.parametrize("D", [2, 3])
def test_lookup_reads_the_feature_of_the_pixel_a_point_projects_to_and_masks_the_rest(D):
    g = torch.Generator().manual_seed(1)
    c2w, K = random_pose(D, g), camera_at_origin(D, focal=1.0)[1]
    image = (4,) if D == 2 else (3, 4)  # W, or (H, W)
    n_pix = math.prod(image)
    features = torch.arange(2 * n_pix, dtype=torch.float32).view(1, 1, 2, *image)  # (B=1, V=1, C=2, *image)
    uv = render.pixel_centers(*image)  # (n_pix, D-1), row-major: pixel k has feature value k
    origins, dirs = render.get_rays(c2w, K, uv)
    points = torch.cat([origins + 2.0 * dirs,  # on each pixel's ray: sees that pixel
                        origins - 2.0 * dirs,  # behind the camera
                        origins[:1] + 2.0 * render.get_rays(c2w, K, torch.full((1, D - 1), 3.0))[1]])  # off-image
    feats, uv_out, depth, seen = render.lookup(features, points[None], c2w[None, None], K[None, None])
    assert feats.shape == (1, 1, 2 * n_pix + 1, 2) and seen.shape == depth.shape == (1, 1, 2 * n_pix + 1)
    assert seen[0, 0, :n_pix].all() and not seen[0, 0, n_pix:].any()
    assert torch.allclose(feats[0, 0, :n_pix, 0], torch.arange(n_pix, dtype=torch.float32), atol=1e-4)
    assert torch.allclose(feats[0, 0, :n_pix, 1], n_pix + torch.arange(n_pix, dtype=torch.float32), atol=1e-4)
    assert (feats[0, 0, n_pix:] == 0).all() and (depth[0, 0, n_pix:2 * n_pix] < 0).all()
    assert torch.allclose(uv_out[0, 0, :n_pix], uv, atol=1e-5)


def test_compositing_stays_float32_under_bf16_inputs():
    t = torch.linspace(0, 1, 8).expand(2, 8)
    out = render.composite(torch.ones(2, 8, dtype=torch.bfloat16), torch.rand(2, 8, 3).bfloat16(), t, torch.ones(2))
    assert out["rgb"].dtype == out["weights"].dtype == torch.float32


def test_compositing_keeps_float64_so_a_gradcheck_is_exact():
    t = torch.linspace(0, 1, 6, dtype=torch.float64).expand(2, 6)
    sigma = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    rgb = torch.rand(2, 6, 3, dtype=torch.float64, requires_grad=True)
    far = torch.ones(2, dtype=torch.float64)
    assert render.composite(sigma, rgb, t, far)["rgb"].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda s, c: render.composite(s, c, t, far)["rgb"], (sigma, rgb))


def test_the_fine_pass_reuses_the_coarse_samples_and_gives_the_render_and_gradients_of_querying_all_again():
    center = torch.tensor([0.0, 0.0, 2.0], requires_grad=True)
    queried = []

    def field(points):  # a soft ball whose position is a parameter
        queried.append(points.shape[-2])
        sigma = 20 * torch.exp(-((points - center) ** 2).sum(-1) / 0.1)
        return sigma, torch.sigmoid(points + center)
    c2w, K = camera_at_origin(3)
    origins, dirs = render.get_rays(c2w, K, render.pixel_centers(4, 4))
    near, far = torch.full((16,), 0.5), torch.full((16,), 4.0)
    out = render.render_rays(field, origins, dirs, near, far, n_samples=16, n_importance=16)
    assert queried == [16, 16]  # each sample queried once
    grad, = torch.autograd.grad(out["rgb"].sum() + out["depth"].sum(), center)
    t = out["t"].detach()  # query every sample again at the same distances: the render and gradient must agree
    sigma, rgb = field(origins[..., None, :] + t[..., None] * dirs[..., None, :])
    again = render.composite(sigma, rgb, t, far)
    grad_again, = torch.autograd.grad(again["rgb"].sum() + again["depth"].sum(), center)
    assert torch.allclose(out["rgb"], again["rgb"], atol=1e-6) and torch.allclose(out["depth"], again["depth"], atol=1e-6)
    assert torch.allclose(grad, grad_again, rtol=1e-4, atol=1e-6) and grad.abs().sum() > 0
