"""Scoring a model on a test set of posed_images/meshes.py against the exact posterior of its hidden part, and
refusing to score it on scenes it may have trained on.

    python sample.py out/scenes3d-dfm/ckpt.pt --meshes out/meshes-test   # built with meshes.py --split test
"""
import os
import shlex

import torch

import dfm
from posed_images import formats, meshes
from toy_problems import metrics, scenes3d, scenes3d_world as world_lib


def overlaps(a, b):
    """Whether paths a and b are one file or folder, or one lies inside the other (symbolic links followed)."""
    if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
        return True
    a, b = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([a, b]) in (a, b)


def check_held_out(data, trained_on, size):
    """Refuse, in one line, to score on scenes a model may have trained on: the set `data` must be a test set
    (meshes.MANIFEST's split), and neither hold nor lie inside trained_on, the data set of the model's checkpoint (its
    config's data, as train.py was given it; "" for the toy's own scenes)."""
    build_test = shlex.join(["python", "-m", "posed_images.meshes", "--out", os.path.normpath(data) + "-test",
                             "--split", "test", "--size", str(size)])
    if trained_on and overlaps(data, trained_on):
        raise ValueError(f"{data}: the model was trained on {trained_on}, which is or overlaps this set; score it "
                         f"on a test set, built with: {build_test}")
    found = meshes.read_manifest(data)
    if found is None:
        raise ValueError(f"{data}: no {meshes.MANIFEST} says which random stream built it (built before --split), "
                         f"so its scenes may be training scenes; build a test set with: {build_test}")
    if found[1]["split"] != "test":
        raise ValueError(f"{data}: a training set ({os.path.join(found[0], meshes.MANIFEST)} says split "
                         f"{found[1]['split']}), never held out; build a test set with: {build_test}")


def held_out_scenes(data, trained_on, size, n_scenes, device="cpu"):
    """The first n_scenes scorable scenes of a built test set `data` (hidden_scores' docstring), each with one context
    view and its far cameras, after check_held_out: (batch, far, posteriors). batch: ctxt_obs (B, 1, 3, S, S) and
    ctxt_params (the context camera at the origin, as in training), trgt_params the far camera straight opposite;
    far: per scene its three far cameras and then its two near ones, c2w (5, 4, 4) and K (5, 3, 3), and near_images
    (2, 3, S, S), the true views of the near cameras; posteriors: per scene its posterior.pt."""
    if not os.path.isdir(data):
        raise FileNotFoundError(f"{data}: no such folder (build a test set with: python -m posed_images.meshes "
                                f"--out {data} --split test)")
    formats.check_finished([data])
    check_held_out(data, trained_on, size)
    names = []
    for name in sorted(os.listdir(data)):
        path = os.path.join(data, name, "posterior.pt")
        if len(names) < n_scenes and os.path.isfile(path):
            hidden = torch.load(path, weights_only=True)["hidden"]
            if hidden.shape[-1] != size:
                raise ValueError(f"{path}: the set was built at {hidden.shape[-1]}x{hidden.shape[-1]}, the model "
                                 f"renders {size}x{size}; build it with --size {size}")
            if hidden[0].sum() >= meshes.MIN_HIDDEN:
                names.append(name)
    if not names:
        raise ValueError(f"{data}: no scene built by posed_images/meshes.py with at least {meshes.MIN_HIDDEN} hidden "
                         "pixels in view")
    contexts, far, posteriors = [], [], []
    for name in names:
        folder = os.path.join(data, name)
        train = formats.load_scene(os.path.join(folder, "transforms_train.json"), "blender", size)
        test = formats.load_scene(os.path.join(folder, "transforms_test.json"), "blender", size)
        posterior = torch.load(os.path.join(folder, "posterior.pt"), weights_only=True)
        if len(test["c2w"]) != len(world_lib.FAR_SIDE_DEG) + 2 or "near_seen" not in posterior:
            raise ValueError(f"{folder}: no near cameras beside the far ones (built by an older meshes.py); build the "
                             f"test set again with: python -m posed_images.meshes --out {data}-new --split test")
        contexts.append((train["images"][0], train["K"][0]))
        # poses relative to the context camera, as in training: c2w (5, 4, 4), K (5, 3, 3), the three far cameras
        # and then the two near ones, with the near views' true images (2, 3, S, S)
        far.append({"c2w": torch.linalg.inv(train["c2w"][0]) @ test["c2w"], "K": test["K"],
                    "near_images": test["images"][len(world_lib.FAR_SIDE_DEG):]})
        posteriors.append(posterior)
    B = len(names)
    ctxt_K = torch.stack([K for _, K in contexts])  # (B, 3, 3)
    batch = {"ctxt_obs": torch.stack([image for image, _ in contexts])[:, None],  # (B, 1, 3, S, S)
             "ctxt_params": {"c2w": torch.eye(4).expand(B, 1, 4, 4), "K": ctxt_K[:, None]},
             "trgt_obs": torch.zeros(B, 3, size, size),  # only its shape is used
             "trgt_params": {k: torch.stack([f[k][0] for f in far]) for k in ("c2w", "K")}}  # straight opposite
    batch = dfm.map_batch(lambda v: v.to(device), batch)
    return batch, far, posteriors


@torch.no_grad()
def hidden_scores(model, data, trained_on, n_scenes=8, n_samples=16, steps=50, seed=0,
                  threshold=world_lib.SHARP_RMSE):
    """How well a model's samples get the hidden colour of the first n_scenes scenes of a built test set `data`,
    scored as the toy's back colours are (scenes3d_world.hidden_colour_scores). trained_on: the data set of the
    model's checkpoint (its config's data; "" for the toy's scenes): check_held_out refuses a set it holds.

    Scenes whose straight-opposite view shows fewer than meshes.MIN_HIDDEN hidden pixels are passed over. Samples
    aim at the far-side camera straight opposite (where the hidden part is in view); each is rendered at the
    three far cameras (scenes3d_world.FAR_SIDE_DEG) and classified as the palette colour whose exact render
    is nearest on the hidden pixels. Returns hidden_tv (total variation between each scene's histogram of
    sampled colours and the exact uniform, from straight opposite), hidden_tv_floor (what exact samples
    score), sharp (the fraction of samples within RMSE threshold of one palette render), consistent (how
    often the 150 and 210 degree views of a sample agree), psnr_context, ssim_context and lpips_context (the
    render at the context camera against the context image; lpips nan without its weights), psnr_near (renders
    from the two near cameras against the truth, on the pixels the context determines) and scenes, how many were
    scored."""
    device, size = next(model.parameters()).device, model.denoiser.setting.world.size
    batch, far, posteriors = held_out_scenes(data, trained_on, size, n_scenes, device)
    B, n, ctxt_K = len(posteriors), n_samples, batch["ctxt_params"]["K"][:, 0]
    signal = dfm.sample_signals(model, batch, n, torch.Generator(device=device).manual_seed(seed), steps)  # B * n
    scores = []
    for v in range(len(world_lib.FAR_SIDE_DEG)):
        params = {k: torch.stack([f[k][v] for f in far]).to(device) for k in ("c2w", "K")}  # (B, ...)
        views = scenes3d.forward(signal, dfm.repeat_batch(params, n)).view(B, n, 3, size, size)
        keep = torch.stack([p["hidden"][v] for p in posteriors])[:, None].to(device)  # (B, 1, S, S)
        colours = torch.stack([p["palette_renders"][v] for p in posteriors]).to(device)  # (B, K, 3, S, S)
        scores.append(world_lib.hidden_colour_scores(views, keep, colours, threshold))
    both = scores[1]["valid"] & scores[2]["valid"]  # (B, 1)
    agree = (scores[1]["nearest"] == scores[2]["nearest"]).float()  # (B, n, 1)
    identity = {"c2w": torch.eye(4, device=device).expand(B * n, 4, 4), "K": ctxt_K.repeat_interleave(n, 0)}
    context = scenes3d.forward(signal, identity)  # (B * n, 3, S, S)
    context_true = batch["ctxt_obs"][:, 0].repeat_interleave(n, 0)
    near, n_far = [], len(world_lib.FAR_SIDE_DEG)
    for j in range(2):  # the near cameras, after the far ones
        params = {k: torch.stack([f[k][n_far + j] for f in far]).to(device) for k in ("c2w", "K")}  # (B, ...)
        true_view = torch.stack([f["near_images"][j] for f in far]).to(device).repeat_interleave(n, 0)
        seen = torch.stack([p["near_seen"][j] for p in posteriors]).to(device).repeat_interleave(n, 0)  # (B * n, S, S)
        near.append(metrics.psnr(scenes3d.forward(signal, dfm.repeat_batch(params, n)), true_view, seen))
    floor = world_lib.hidden_floor(n, B, torch.Generator().manual_seed(seed), len(meshes.PALETTE))
    return {"hidden_tv": scores[0]["tv"], "hidden_tv_floor": floor, "sharp": scores[0]["sharp"],
            "consistent": (agree * both[:, None]).sum().item() / max(1, n * both.sum().item()),
            "psnr_context": metrics.psnr(context, context_true).mean().item(),
            "ssim_context": metrics.ssim(context, context_true).mean().item(),
            "lpips_context": metrics.mean_lpips(context, context_true),
            "psnr_near": torch.cat(near).mean().item(), "scenes": B}
