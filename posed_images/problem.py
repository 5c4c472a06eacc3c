"""The problem train.py and sample.py use for posed images on disk: scenes3d's model (toy_problems/scenes3d.py,
scenes3d_networks.py) with the data set's batches (posed_images/dataset.py) and scores that need no exact
posterior, and the pictures and the one-image context of sample.py.

    python train.py --problem scenes3d --data PATH --format re10k|co3d|blender
    python sample.py out/scenes3d-dfm/ckpt.pt --image my.png --fov 60
"""
import functools
import math
import os
from dataclasses import replace

import torch

import dfm
import toy_problems
from toy_problems import metrics, scenes3d, scenes3d_eval
from posed_images.dataset import FORMATS, SceneSet, StepBatches, check_not_held_out


def setting_for(name, format):
    """scenes3d's setting `name` (its image size and networks) for a format's scenes: rays from the format's near
    to its far, rendered depths mapped to [0, 1] over that range, and points encoded relative to its typical
    depth (the setting's world.cam_dist); the encoders' features at full resolution, for thin parts that a
    half-resolution feature map blurs (RESULTS.md, real meshes)."""
    base, fmt = scenes3d.SETTINGS[name], FORMATS[format]
    return replace(base, world=replace(base.world, cam_dist=fmt.depth), box=None, near_far=(fmt.near, fmt.far),
                   depth_range=(fmt.near, fmt.far), full_res=True)


def make_problem(name, data, format, frame_window=0, workers=0, progress=True):
    """The toy protocol (toy_problems/__init__.py) of scenes3d setting `name` on the data set at `data`.

    The data set is indexed, checked and its images cached (SceneSet) when a batch or the loader is first
    asked for (train.py asks for the loader before it writes anything), so that building a model, e.g. to
    sample from a checkpoint, reads nothing."""
    setting = setting_for(name, format)

    opened = []

    def dataset(rank=0):
        if not opened:
            opened.append(SceneSet(data, format, setting.world.size, frame_window, setting.patch, workers=workers,
                                   rank=rank, progress=progress))
        return opened[0]

    def sample_batch(batch_size, generator, device="cpu"):
        return dataset().sample_batch(batch_size, generator, device)

    def loader(batch_size, seed, rank, steps):
        """Training batches of the steps in `steps` (a range), made ahead by `workers` DataLoader workers; never
        from a test set (check_not_held_out)."""
        check_not_held_out(dataset(rank).sequences)
        return iter(torch.utils.data.DataLoader(StepBatches(dataset(rank), batch_size, seed, rank), batch_size=None,
                                                sampler=steps, num_workers=workers))

    def held_out_batch(n_contexts, seed=0, device="cpu"):
        """Evaluation examples drawn from the held-out stream: other draws from the same sequences (a data
        set on disk has no held-out scenes unless you point --data at one)."""
        return sample_batch(n_contexts, toy_problems.held_out_generator(seed), device)

    return scenes3d_eval.make_problem(name, setting, sample_batch=sample_batch, loader=loader,
                                      held_out_batch=held_out_batch,
                                      evaluate=functools.partial(evaluate, held_out_batch=held_out_batch),
                                      plot=functools.partial(plot, held_out_batch=held_out_batch),
                                      animate=functools.partial(animate, held_out_batch=held_out_batch))


def evaluate(model, seed=0, n_contexts=8, n_samples=4, steps=50, held_out_batch=None, **sample_kwargs):
    """Scores that need no exact posterior, averaged over samples: PSNR, SSIM and LPIPS (nan when its weights
    are unavailable) of the sampled scenes rendered at the context camera (against the context image) and at
    the target camera, a frame drawn as in training (within --frame-window; mostly a far-side one in a set that
    names its context frame), against that frame: pixel scores, which the conditional mean wins."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    signal = dfm.sample_signals(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps,
                                **sample_kwargs)  # aimed at each example's target camera: B * n fields
    scores = {}
    with torch.no_grad():
        context_params = dfm.map_batch(lambda v: v[:, 0], batch["ctxt_params"])
        for view, obs, params in (("context", batch["ctxt_obs"][:, 0], context_params),
                                  ("near", batch["trgt_obs"], batch["trgt_params"])):
            rendered = scenes3d.forward(signal, dfm.repeat_batch(params, n_samples))  # (B * n, 3, H, W)
            truth = obs.repeat_interleave(n_samples, dim=0)
            scores[f"psnr_{view}"] = metrics.psnr(rendered, truth).mean().item()
            scores[f"ssim_{view}"] = metrics.ssim(rendered, truth).mean().item()
            scores[f"lpips_{view}"] = metrics.mean_lpips(rendered, truth)
    return scores


@torch.no_grad()
def plot(model, path, seed=0, n_contexts=3, n_samples=4, steps=50, compare=None, held_out_batch=None):
    """For each held-out example: the context, the true target frame, and sampled scenes (and, if given, the
    comparison model's prediction) rendered at the target camera."""
    device = next(model.parameters()).device
    batch = held_out_batch(n_contexts, seed, device)
    columns = [("context", batch["ctxt_obs"][:, 0]), ("target frame", batch["trgt_obs"])]
    for m, n in [(model, n_samples)] + ([(compare, 1)] if compare is not None else []):
        signal = dfm.sample_signals(m, batch, n, torch.Generator(device=device).manual_seed(seed), steps)
        views = scenes3d.forward(signal, dfm.repeat_batch(batch["trgt_params"], n))
        views = views.view(n_contexts, n, *batch["trgt_obs"].shape[1:])  # (B, n, 3, S, S)
        columns += [(f"{m.kind} {i + 1}" if n > 1 else m.kind, views[:, i]) for i in range(n)]
    scenes3d_eval.save_grid(columns, "posed images: sampled scenes seen from the target frame's camera", path)


def arc_cameras(K, depth, n_frames=24, degrees=30.0):
    """Cameras swinging left and right by up to `degrees` around the point `depth` in front of the camera at
    the origin (the context camera), always looking at it: dict c2w (F, 4, 4), K (F, 3, 3)."""
    angle = torch.sin(torch.arange(n_frames) * 2 * math.pi / n_frames) * math.radians(degrees)  # (F,)
    c, s, zero, one = angle.cos(), angle.sin(), torch.zeros(n_frames), torch.ones(n_frames)
    R = torch.stack([torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1),
                     torch.stack([-s, zero, c], -1)], -2)  # (F, 3, 3) about the camera's y axis (image down)
    c2w = torch.eye(4).repeat(n_frames, 1, 1)
    c2w[:, :3, :3] = R
    c2w[:, :3, 3] = torch.tensor([0.0, 0.0, depth]) - depth * R[:, :, 2]  # the look-at point stays put
    return {"c2w": c2w, "K": K.expand(n_frames, 3, 3)}


@torch.no_grad()
def orbit_gif(model, batch, path, orbit, n_samples=3, steps=50, seed=0):
    """A GIF of n_samples scenes sampled from the one context of batch (ctxt_obs (1, 1, 3, H, W), ctxt_params,
    and trgt_params, the camera the samples aim at), seen along `orbit` (c2w (F, 4, 4), K (F, 3, 3)),
    beside the context image."""
    device = batch["ctxt_obs"].device
    orbit = dfm.map_batch(lambda v: v.to(device), orbit)
    batch = {**batch, "trgt_obs": batch["ctxt_obs"][:, 0]}  # only its shape is used
    signal = dfm.sample_signals(model, batch, n_samples, torch.Generator(device=device).manual_seed(seed), steps)
    panels = [(f"{model.kind} {i + 1}", scenes3d_eval.orbit_frames(signal, i, orbit)) for i in range(n_samples)]
    scenes3d_eval.save_gif(panels, path, still=("context", batch["ctxt_obs"][0, 0]))


def animate(model, path, seed=0, index=0, n_samples=3, n_frames=24, steps=50, compare=None, held_out_batch=None):
    """orbit_gif of held-out example `index` along arc_cameras (compare is not drawn: no true scene to orbit)."""
    device = next(model.parameters()).device
    batch = dfm.map_batch(lambda v: v[index:index + 1], held_out_batch(index + 1, seed, device))
    orbit = arc_cameras(batch["ctxt_params"]["K"][0, 0].cpu(), model.denoiser.setting.world.cam_dist, n_frames)
    orbit_gif(model, batch, path, orbit, n_samples, steps, seed)  # the samples aim at the example's target frame


def image_context(path, fov_deg, size):
    """One image of the user's own as a context: obs (1, 1, 3, S, S) and params with c2w the identity (the pose at
    the origin, as every training example's context) and K from the horizontal field of view of the image as
    it is on disk (square pixels, centred), then centre-cropped and resized like the training frames."""
    from posed_images.formats import crop_and_resize, read_image
    if not 0 < fov_deg < 180:
        raise ValueError(f"--fov must be in (0, 180) degrees, got {fov_deg}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image")
    image = read_image(path)  # a one-line error naming the file if PIL cannot read it whole
    H, W = image.shape[-2:]
    if min(H, W) < size:  # enlarging would invent detail the model never saw in training
        raise ValueError(f"{path}: the image is {W}x{H} (WxH); this model needs at least {size} pixels on its "
                         f"shorter side (it is centre-cropped to a square and resized to {size}x{size})")
    fx = 0.5 / math.tan(math.radians(fov_deg) / 2)  # normalised by W
    K = torch.tensor([[fx, 0.0, 0.5], [0.0, fx * W / H, 0.5], [0.0, 0.0, 1.0]])
    image, K = crop_and_resize(image, K, size)
    return 2 * image[None, None] - 1, {"c2w": torch.eye(4)[None, None], "K": K[None, None]}
