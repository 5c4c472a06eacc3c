"""The 3D problem's protocol: scores and pictures of model samples against the exact posterior, view
by view, and problem(name), the toy protocol that toy_problems.load returns.

Sampling (dfm.sample_signals): the target camera is the one straight opposite the context camera,
where the hidden back halves are in full view, so every sample has to commit to a back colour;
the sampled scene is the field of the last denoising step (scenes3d.Signal), rendered from any camera.

Scores (evaluate):
- back_tv: total variation between each context's histogram of sampled back colours (seen
  from the far side, classified against renders of the true geometry in every palette colour)
  and the exact uniform one, with back_tv_floor, what exact samples of the same size score;
  sharp: the fraction of samples within SHARP_RMSE of one palette colour (a blurry average
  back is near none of them); consistent: how often two far-side views of one sample (at
  +-30 degrees from straight opposite) agree on its back colour (3D consistency).
- psnr_context, ssim_context, lpips_context: the render at the context camera against the
  context image (everything there is determined by the context); psnr_near: renders 20
  degrees to either side against the truth, on the pixels the context determines (all but
  the true back halves).
- views: energy distance between renders from a ring of cameras of model samples and of exact
  posterior samples (rendered exactly), with views_floor for two exact sample sets.
"""
import dataclasses
import functools
import math
import types

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import dfm
import toy_problems
from toy_problems import metrics, scenes3d, scenes3d_networks, scenes3d_world as world_lib

N_PROBES = 8  # ring cameras for the view energy distance
NEAR_DEG = 20.0  # "close to the context view"


def exact_posterior(ctxt_obs, ctxt_params, n_samples, generator, setting):
    """Exact posterior scenes for contexts ctxt_obs (B, Nc, 3, H, W) (the first view is the context
    camera's): a scenes dict with leading (B, n) (see scenes3d_world.exact_posterior_scenes)."""
    return world_lib.exact_posterior_scenes(ctxt_obs[:, 0], n_samples, generator, setting.world)


def cameras_at(degrees, n, setting, device):
    """n copies of the camera at `degrees` of azimuth from the context camera: c2w (n, 4, 4), K (n, 3, 3)."""
    azimuth = torch.full((n,), world_lib.CONTEXT_AZIMUTH + math.radians(degrees), device=device)
    return world_lib.cameras(azimuth, world=setting.world)


def opposite(batch, setting):
    """The batch with its target camera straight opposite the context camera, where the samples aim."""
    return {**batch, "trgt_params": cameras_at(180.0, len(batch["ctxt_obs"]), setting, batch["ctxt_obs"].device)}


def render_at(signal, degrees):
    """A batch of N sampled fields rendered from the camera at `degrees` from the context camera: (N, 3, H, W)."""
    return scenes3d.forward(signal, cameras_at(degrees, len(signal.views.t), signal.setting, signal.views.t.device))


def evaluate(model, seed=0, n_contexts=8, n_samples=16, steps=50, histogram_path=None, **sample_kwargs):
    """The scores of the module docstring (a dict), for held-out contexts of the model's setting.
    histogram_path: also save each context's histogram of sampled back colours there (plot_histograms)."""
    setting = model.denoiser.setting
    device = next(model.parameters()).device
    batch = scenes3d.held_out_batch(n_contexts, seed, device, setting)
    w, B, n = setting.world, n_contexts, n_samples
    signal = dfm.sample_signals(model, opposite(batch, setting), n, torch.Generator(device=device).manual_seed(seed),
                                steps, **sample_kwargs)  # B * n fields, the n of a context together
    truth = batch["scenes"]
    exact_a, exact_b = (exact_posterior(batch["ctxt_obs"], None, n,
                                        torch.Generator(device=device).manual_seed(seed + i), setting) for i in (1, 2))

    def flat(scenes):  # leading (B, n) -> (B * n)
        return {k: v.flatten(0, 1) for k, v in scenes.items()}

    scores = {}
    with torch.no_grad():
        # the hidden half, from the three far-side cameras
        far = {deg: render_at(signal, deg).view(B, n, 3, w.size, w.size) for deg in world_lib.FAR_SIDE_DEG}
        results = {deg: world_lib.back_colour_scores(far[deg], truth, cameras_at(deg, B, setting, device), w)
                   for deg in world_lib.FAR_SIDE_DEG}
        straight = results[180.0]
        scores["back_tv"] = straight["tv"]
        scores["back_tv_floor"] = world_lib.hidden_floor(n, B * w.n_spheres, torch.Generator().manual_seed(seed),
                                                         len(w.palette))
        scores["sharp"] = straight["sharp"]
        if histogram_path is not None:
            plot_histograms(straight["histogram"], w.palette, histogram_path)
        both = results[150.0]["valid"] & results[210.0]["valid"]  # (B, M)
        agree = (results[150.0]["nearest"] == results[210.0]["nearest"]).float()  # (B, n, M)
        scores["consistent"] = (agree * both[:, None]).sum().item() / max(1, n * both.sum().item())
        # the seen part
        ctxt_view = render_at(signal, 0.0)  # (B*n, 3, H, W)
        context = batch["ctxt_obs"][:, 0].repeat_interleave(n, dim=0)
        scores["psnr_context"] = metrics.psnr(ctxt_view, context).mean().item()
        scores["ssim_context"] = metrics.ssim(ctxt_view, context).mean().item()
        scores["lpips_context"] = metrics.mean_lpips(ctxt_view, context)
        near = []
        for deg in (-NEAR_DEG, NEAR_DEG):
            params = cameras_at(deg, B, setting, device)
            true_view = world_lib.render_scenes(truth, params, w).repeat_interleave(n, dim=0)
            parts = world_lib.render_parts(truth, params, w).repeat_interleave(n, dim=0)  # (B*n, H, W)
            determined = (parts < 2) | (parts % 2 == 1)  # sky, ground and front halves
            near.append(metrics.psnr(render_at(signal, deg), true_view, determined))
        scores["psnr_near"] = torch.cat(near).mean().item()
        # the whole distribution, from a ring of cameras
        ring = [k * 360.0 / N_PROBES for k in range(N_PROBES)]
        model_views = torch.stack([render_at(signal, d) for d in ring], 1)
        exact_views = [torch.stack([world_lib.render_scenes(flat(e), cameras_at(d, B * n, setting, device), w)
                                    for d in ring], 1) for e in (exact_a, exact_b)]
        views = [v.reshape(B, n, -1) for v in (model_views, *exact_views)]
        scores["views"] = dfm.energy_distance(views[0], views[1]).mean().item()
        scores["views_floor"] = dfm.energy_distance(views[2], views[1]).mean().item()
    return scores


def to_image(obs):
    return ((obs.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def plot(model, path, seed=0, n_contexts=3, n_samples=6, steps=50, compare=None):
    """One block of rows per held-out context: the context image and the truth, then two exact
    posterior samples, n_samples model samples side by side (and, if given, a comparison model's
    prediction), each seen from straight opposite the context (where the hidden back is), from
    the side (90 degrees), and as a depth map from straight opposite."""
    setting = model.denoiser.setting
    device = next(model.parameters()).device
    w, B = setting.world, n_contexts
    batch = scenes3d.held_out_batch(B, seed, device, setting)
    n_exact = 2
    exact = exact_posterior(batch["ctxt_obs"], None, n_exact, torch.Generator(device=device).manual_seed(seed), setting)
    exact = {k: v.flatten(0, 1) for k, v in exact.items()}
    columns = [("context", 0), ("truth", 0)] + [("exact", i) for i in range(n_exact)]
    rendered, counts = {("context", 180.0): batch["ctxt_obs"]}, {"exact": n_exact, "context": 1, "truth": 1}
    others = [] if compare is None else [(compare.kind if compare.kind != model.kind else "compared", compare, 1)]
    for name, m, n in [(model.kind, model, n_samples)] + others:
        signal = dfm.sample_signals(m, opposite(batch, setting), n, torch.Generator(device=device).manual_seed(seed),
                                    steps)
        for deg in (180.0, 90.0):
            rendered[name, deg] = render_at(signal, deg).view(B, n, 3, w.size, w.size)
        depth = scenes3d.render_pixels(signal, cameras_at(180.0, B * n, setting, device))["depth"]
        rendered[name, "depth"] = depth.view(B, n, w.size, w.size)
        columns += [(name, i) for i in range(n)]
        counts[name] = n
    for deg in (180.0, 90.0):
        rendered["exact", deg] = world_lib.render_scenes(exact, cameras_at(deg, B * n_exact, setting, device), w).view(
            B, n_exact, 3, w.size, w.size)
        truth = world_lib.render_scenes(batch["scenes"], cameras_at(deg, B, setting, device), w)  # (B, 3, H, W)
        rendered["truth", deg] = truth[:, None]
    rows = [(180.0, "from opposite"), (90.0, "from the side"), ("depth", "depth, opposite")]  # the context in row 0
    fig, axes = plt.subplots(3 * B, len(columns), figsize=(1.05 * len(columns) + 0.6, 3.3 * B), squeeze=False)
    for i in range(B):
        for r, (key, label) in enumerate(rows):
            for j, (name, k) in enumerate(columns):
                ax = axes[3 * i + r, j]
                if key == "depth" and (name, "depth") in rendered:
                    ax.imshow(rendered[name, "depth"][i, k].cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
                elif (name, key) in rendered:
                    ax.imshow(to_image(rendered[name, key][i, k]))
                if j == 1:
                    ax.set_ylabel(label, fontsize=7)
                if r == 0 and (i == 0 or name == "context"):
                    ax.set_title(f"context {i + 1}" if name == "context" else f"{name} {k + 1}" if counts[name] > 1
                                 else name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle("3D scenes sampled from one image. The context camera never sees a sphere's back half, so each "
                 "sample should\npaint it one palette colour, each colour equally often; a regression paints "
                 "the average.", fontsize=8)
    fig.tight_layout()
    toy_problems.save_figure(fig, path)


def plot_histograms(histogram, palette, path):
    """Each context's histogram of sampled back colours (B, K) as bars in the palette's colours,
    against the exact posterior's uniform 1/K."""
    B, K = histogram.shape
    fig, axes = plt.subplots(1, B, figsize=(0.9 * B + 0.5, 1.6), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.bar(range(K), histogram[i].cpu().numpy(), color=palette)
        ax.axhline(1 / K, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks([]), ax.set_title(f"context {i + 1}", fontsize=7)
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("share of samples", fontsize=7)
    axes[0, 0].tick_params(labelsize=6)
    fig.suptitle(f"Sampled back colours per held-out context\n(dashed: the exact posterior's 1/{K})", fontsize=8)
    fig.tight_layout()
    toy_problems.save_figure(fig, path)


@torch.no_grad()
def animate(model, path, seed=0, index=0, n_samples=3, n_frames=24, steps=50, compare=None):
    """A GIF of a camera orbiting sampled scenes of held-out context `index` (the contexts of plot()),
    with the true scene and, if given, a comparison model's prediction."""
    setting = model.denoiser.setting
    device = next(model.parameters()).device
    w = setting.world
    batch = scenes3d.held_out_batch(index + 1, seed, device, setting)
    batch = dfm.map_batch(lambda v: v[index:], batch)
    orbit = world_lib.orbit_cameras(n_frames, w, device)  # (F, ...)
    truth = {k: v.expand(n_frames, *v.shape[1:]) for k, v in batch["scenes"].items()}  # (F, ...) the one scene
    panels = [("truth", world_lib.render_scenes(truth, orbit, w))]
    for m, n in [(model, n_samples)] + ([(compare, 1)] if compare is not None else []):
        signal = dfm.sample_signals(m, opposite(batch, setting), n, torch.Generator(device=device).manual_seed(seed),
                                    steps)
        panels += [(f"{m.kind} {i + 1}" if n > 1 else m.kind, orbit_frames(signal, i, orbit)) for i in range(n)]
    save_gif(panels, path)


def orbit_frames(signal, i, orbit):
    """Field i of a batch of sampled fields seen from every camera of orbit (c2w (F, 4, 4), K): (F, 3, H, W)."""
    n_frames = len(orbit["c2w"])
    one = dataclasses.replace(signal, views=signal.views.map(lambda v: v[i:i + 1].expand(n_frames, *v.shape[1:])))
    return scenes3d.forward(one, orbit)


def save_grid(columns, title, path):
    """A figure of image columns side by side, each a (title, images (B, 3, H, W)), one row per example."""
    B = len(columns[0][1])
    fig, axes = plt.subplots(B, len(columns), figsize=(1.15 * len(columns), 1.25 * B + 0.3), squeeze=False)
    for j, (name, images) in enumerate(columns):
        for i in range(B):
            axes[i, j].imshow(to_image(images[i]))
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        axes[0, j].set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    toy_problems.save_figure(fig, path)


def save_gif(panels, path, still=None):
    """A GIF of panels side by side, each a (title, frames (F, 3, H, W)) played in step, after an optional
    still (title, image (3, H, W)) that stays put (a context image)."""
    from matplotlib.animation import FuncAnimation
    shown = ([still] if still is not None else []) + [(name, frames[0]) for name, frames in panels]
    fig, axes = plt.subplots(1, len(shown), figsize=(1.6 * len(shown), 1.9), squeeze=False)
    images = []
    for ax, (name, image) in zip(axes[0], shown):
        images.append(ax.imshow(to_image(image)))
        ax.set_title(name, fontsize=7), ax.set_xticks([]), ax.set_yticks([])
    images = images[len(shown) - len(panels):]  # the still is not animated
    fig.tight_layout()

    def frame(f):
        for image, (_, frames) in zip(images, panels):
            image.set_data(to_image(frames[f]))
        return images

    toy_problems.save_animation(fig, FuncAnimation(fig, frame, frames=len(panels[0][1]), blit=True), path)


def memory_per_sample(name, precision="fp32", seed=0):
    """Training memory of one example (batch 1) of problem `name`, in bytes, counted on any device:
    parameters, gradients, Adam's two moments and the EMA copy (5 x the parameters), plus every
    tensor autograd saves for the backward pass of one training step (distinct storages, counted
    once). Returns dict(weights=..., activations=..., total=...)."""
    import toy_problems
    problem = toy_problems.load(name)
    torch.manual_seed(seed)
    model = dfm.make_model("dfm", problem.make_denoiser("dfm"), problem.forward, obs_loss=problem.obs_loss)
    batch = problem.sample_batch(1, torch.Generator().manual_seed(seed))
    weights = 5 * sum(p.numel() * p.element_size() for p in model.parameters())
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(batch)
    loss.backward()
    activations = sum(storages.values())
    return {"weights": weights, "activations": activations, "total": weights + activations}


def problem(name):
    """The toy protocol (see toy_problems/__init__.py) for "scenes3d", "scenes3d-64" or "scenes3d-128"."""
    setting = scenes3d.SETTINGS[name]
    return make_problem(name, setting, sample_batch=functools.partial(scenes3d.sample_batch, setting=setting),
                        held_out_batch=functools.partial(scenes3d.held_out_batch, setting=setting),
                        exact_posterior=functools.partial(exact_posterior, setting=setting),
                        evaluate=evaluate, plot=plot, animate=animate)


def make_problem(name, setting, **data):
    """The toy protocol (toy_problems/__init__.py) of the 3D model of problem `name` at `setting`: the model's
    parts, and the data's given as keywords (sample_batch, held_out_batch, evaluate, plot, animate; and
    exact_posterior for the toy's scenes, loader for posed images on disk). The one place both are built:
    problem() below and posed_images/problem.make_problem call it."""
    return types.SimpleNamespace(NAME=name, SETTING=setting, TRAIN_DEFAULTS=scenes3d.TRAIN_DEFAULTS[name],
                                 forward=scenes3d.forward,
                                 obs_loss=functools.partial(scenes3d.obs_loss, setting=setting),
                                 make_denoiser=functools.partial(scenes3d_networks.make_denoiser, setting=setting),
                                 **data)
