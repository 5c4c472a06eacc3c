"""Posed images written to disk in the formats posed_images/formats.py reads, each writer the exact inverse of its
reader: the tests and posed_images/meshes.py use them. Every file they write appears whole or not at all
(toy_problems.written_whole)."""
import gzip
import json
import math
import os

import numpy as np
import torch
from PIL import Image

import toy_problems
from posed_images.formats import OPENCV_FROM_OPENGL, OPENCV_FROM_PYTORCH3D


def to_uint8(image):
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8 numpy."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_image(array, path):
    """(H, W, C) uint8 numpy -> an image file whose format its extension names, written whole or not at all."""
    with toy_problems.written_whole(path) as tmp:
        Image.fromarray(array).save(tmp)


def write_re10k(path, c2w, K, images, timestamps=None, ext=".png"):
    """Write <split>/<sequence>.txt and its frames: c2w (N, 4, 4), K (N, 3, 3) normalised, images (N, 3, H, W)."""
    folder = os.path.splitext(path)[0]
    timestamps = timestamps if timestamps is not None else [1000 * (i + 1) for i in range(len(c2w))]
    lines = ["https://www.youtube.com/watch?v=written-by-dfm"]
    for ts, pose, k, image in zip(timestamps, c2w, K, images):
        w2c = torch.linalg.inv(pose.double())[:3].flatten().tolist()
        values = [k[0, 0], k[1, 1], k[0, 2], k[1, 2], 0.0, 0.0, *w2c]
        lines.append(f"{ts} " + " ".join(f"{float(x):.10g}" for x in values))
        save_image(to_uint8(image), os.path.join(folder, f"{ts}{ext}"))
    with toy_problems.written_whole(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_co3d(root, category, sequence, c2w, K, images):
    """Write <root>/<category>/<sequence>/images/frameNNNNNN.png and add the sequence's entries to
    <root>/<category>/frame_annotations.jgz (ndc_isotropic intrinsics, PyTorch3D R and T)."""
    category_dir = os.path.join(root, category)
    path = os.path.join(category_dir, "frame_annotations.jgz")
    entries = []
    if os.path.exists(path):
        with gzip.open(path, "rt") as f:
            entries = json.load(f)
    for i, (pose, k, image) in enumerate(zip(c2w, K, images)):
        H, W = image.shape[-2:]
        w2c = np.linalg.inv(pose.double().numpy())
        s = min(H, W) / 2
        rel = f"{category}/{sequence}/images/frame{i + 1:06d}.png"
        save_image(to_uint8(image), os.path.join(root, rel))
        entries.append({"sequence_name": sequence, "frame_number": i, "frame_timestamp": i / 30,
                        "image": {"path": rel, "size": [H, W]},
                        "viewpoint": {"R": (OPENCV_FROM_PYTORCH3D @ w2c[:3, :3]).T.tolist(),
                                      "T": (OPENCV_FROM_PYTORCH3D @ w2c[:3, 3]).tolist(),
                                      "focal_length": [float(k[0, 0]) * W / s, float(k[1, 1]) * H / s],
                                      "principal_point": [(W / 2 - float(k[0, 2]) * W) / s,
                                                          (H / 2 - float(k[1, 2]) * H) / s],
                                      "intrinsics_format": "ndc_isotropic"}})
    with toy_problems.written_whole(path) as tmp, gzip.open(tmp, "wt") as f:
        json.dump(entries, f)


def write_blender(path, c2w, K, images, alpha=None, context_frame=None):
    """Write a transforms_*.json and its frames (RGBA PNGs when alpha (N, H, W) in [0, 1] is given; the RGB of
    fully transparent pixels is then arbitrary). Needs cx = cy = 0.5 and square pixels.
    context_frame: an extra key that multiview's data sets honour: every example uses that frame as context."""
    H, W = images.shape[-2:]
    fx = float(K[0, 0, 0])
    if not (torch.allclose(K[:, :2, 2], torch.tensor(0.5)) and torch.allclose(K[:, 1, 1] * H, K[:, 0, 0] * W)
            and torch.allclose(K[:, 0, 0], K[0, 0, 0])):
        raise ValueError("NeRF-synthetic cameras share one focal length, square pixels and cx = cy = 0.5")
    folder, split = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0].replace("transforms_", "")
    frames = []
    for i, (pose, image) in enumerate(zip(c2w, images)):
        rgb = to_uint8(image)
        if alpha is not None:
            rgb = np.concatenate([rgb, (alpha[i].clamp(0, 1) * 255).round().byte().numpy()[..., None]], axis=-1)
        save_image(rgb, os.path.join(folder, split, f"r_{i}.png"))
        frames.append({"file_path": f"./{split}/r_{i}",
                       "transform_matrix": (pose.double().numpy() @ OPENCV_FROM_OPENGL).tolist()})
    meta = {"camera_angle_x": 2 * math.atan(0.5 / fx), "frames": frames}
    if context_frame is not None:
        meta["context_frame"] = context_frame
    with toy_problems.written_whole(path) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1)

