"""Posed images on disk, in the formats users already have, read into the project's cameras.

    scene = formats.load_scene(path, format)   # format: "re10k" | "co3d" | "blender"
    scene["c2w"]     # (N, 4, 4) float, camera-to-world, OpenCV axes (x right, y down, z forward)
    scene["K"]       # (N, 3, 3) float, intrinsics normalised by image width and height
    scene["images"]  # (N, 3, H, W) float in [-1, 1]; with size=S, centre-cropped and resized to S x S

What each format stores and how it is converted (GUIDE section 6):
  re10k    one sequence: <split>/<sequence>.txt, line 1 a video URL, then one line per frame,
           `timestamp fx fy cx cy k1 k2` and the 3x4 world-to-camera matrix row by row, with OpenCV
           axes and intrinsics already normalised: c2w = inverse(w2c). Frames beside it, in
           <split>/<sequence>/<timestamp>.png (or .jpg).
  co3d     one sequence folder <root>/<category>/<sequence>; its frames are the entries of
           <root>/<category>/frame_annotations.jgz (gzipped JSON list) with that sequence_name,
           image paths relative to <root>. Cameras are PyTorch3D's: X_cam = X_world R + T with
           camera +X left and +Y up, so w2c (OpenCV) = diag(-1, -1, 1) [R^T | T]; intrinsics in NDC
           units s ("ndc_isotropic": s = min(H, W) / 2; "ndc_norm_image_bounds": s = W/2 for x and
           H/2 for y): fx = f0 s, cx = W/2 - p0 s, and the same for y.
  blender  one transforms_*.json (NeRF-synthetic): camera_angle_x and frames whose file_path is
           relative to the json's folder (".png" added if it has no extension) and whose
           transform_matrix is camera-to-world in OpenGL axes (y up, z back): c2w = c2w_gl
           diag(1, -1, -1, 1); fx = 0.5 / tan(camera_angle_x / 2) (square pixels), cx = cy = 0.5.
           RGBA images are composited over black, the background of our renderer.

Resizing: a centre crop to a square of side c = min(H, W) at (x0, y0) changes fx' = fx W / c,
cx' = (cx W - x0) / c (the same for y); resizing the square changes nothing in normalised units.
Every write_* function is the exact inverse of its reader: the tests and posed_images/meshes.py use them.
Training on data sets of such sequences (scale, near/far, caching, batches) is in dataset.py.
"""
import gzip
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENCV_FROM_PYTORCH3D = np.diag([-1.0, -1.0, 1.0])  # camera +X left, +Y up -> right, down
OPENCV_FROM_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])  # camera y up, z back -> y down, z forward


def bad(path, what):
    """The one-line error for a file that is not what its format expects."""
    return ValueError(f"{path}: {what}")


def check_pose(c2w, path, frame):
    """c2w (4, 4) numpy must be finite, invertible, and its 3x3 part a rotation (the renderer assumes one)."""
    R = c2w[:3, :3]
    if not np.isfinite(c2w).all() or abs(np.linalg.det(R)) < 1e-6:
        raise bad(path, f"the pose of frame {frame} is not invertible (expected a rotation and a translation)")
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-3:
        raise bad(path, f"the pose of frame {frame} is not a rotation (scaled or sheared axes); expected a rigid pose")


def intrinsics(fx, fy, cx, cy):
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


# -----------------------------------------------------------------------------
# Readers: one sequence's cameras and frame files (images are read by load_frames)


def read_re10k(path):
    """RealEstate10K: dict name, c2w (N, 4, 4), K (N, 3, 3), files [N], sizes None (any size, read from the frames)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such camera file (expected <split>/<sequence>.txt)")
    with open(path) as f:
        lines = [line.split() for line in f.read().splitlines()[1:] if line.strip()]  # line 1: the video URL
    if not lines:
        raise bad(path, "no camera lines after the URL line (expected `timestamp fx fy cx cy k1 k2` + 12 numbers)")
    folder = os.path.splitext(path)[0]
    c2w, K, files = [], [], []
    for number, row in enumerate(lines, start=2):
        if len(row) != 19:
            raise bad(path, f"line {number} has {len(row)} columns; expected 19: timestamp fx fy cx cy k1 k2 "
                            "and the 3x4 world-to-camera matrix row by row")
        try:
            values = [float(x) for x in row[1:]]
        except ValueError:
            raise bad(path, f"line {number} has a column that is not a number") from None
        w2c = np.eye(4)
        w2c[:3] = np.array(values[6:]).reshape(3, 4)
        if not np.isfinite(w2c).all() or abs(np.linalg.det(w2c[:3, :3])) < 1e-6:
            raise bad(path, f"the pose on line {number} is not invertible")
        c2w.append(np.linalg.inv(w2c))
        check_pose(c2w[-1], path, f"{row[0]} (line {number})")
        K.append(intrinsics(*values[:4]))
        stem = os.path.join(folder, row[0])
        files.append(next((stem + ext for ext in (".png", ".jpg") if os.path.exists(stem + ext)), stem + ".png"))
    return {"name": os.path.basename(folder), "c2w": np.stack(c2w), "K": np.stack(K), "files": files, "sizes": None}


def co3d_camera(viewpoint, H, W, path, frame):
    """A CO3D viewpoint dict (PyTorch3D camera) of an H x W image -> (c2w, K) in our convention."""
    R, T = np.array(viewpoint["R"], dtype=np.float64), np.array(viewpoint["T"], dtype=np.float64)
    if R.shape != (3, 3) or T.shape != (3,):
        raise bad(path, f"frame {frame}: viewpoint R must be 3x3 and T 3 numbers, got {R.shape} and {T.shape}")
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = OPENCV_FROM_PYTORCH3D @ R.T, OPENCV_FROM_PYTORCH3D @ T
    if not np.isfinite(w2c).all() or abs(np.linalg.det(w2c[:3, :3])) < 1e-6:
        raise bad(path, f"the pose of frame {frame} is not invertible")
    c2w = np.linalg.inv(w2c)
    check_pose(c2w, path, frame)
    kind = viewpoint.get("intrinsics_format", "ndc_norm_image_bounds")  # PyTorch3D's default
    if kind == "ndc_isotropic":
        sx = sy = min(H, W) / 2
    elif kind == "ndc_norm_image_bounds":
        sx, sy = W / 2, H / 2
    else:
        raise bad(path, f"frame {frame}: unknown intrinsics_format {kind!r}; expected ndc_isotropic or "
                        "ndc_norm_image_bounds")
    (f0, f1), (p0, p1) = viewpoint["focal_length"], viewpoint["principal_point"]
    return c2w, intrinsics(f0 * sx / W, f1 * sy / H, (W / 2 - p0 * sx) / W, (H / 2 - p1 * sy) / H)


def read_co3d_annotations(category_dir):
    """{sequence_name: [entries sorted by frame_number]} of <category>/frame_annotations.jgz."""
    path = os.path.join(category_dir, "frame_annotations.jgz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a CO3D sequence <root>/<category>/<sequence> needs "
                                "<root>/<category>/frame_annotations.jgz)")
    try:
        with gzip.open(path, "rt") as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise bad(path, f"not a gzipped JSON list ({e})") from None
    sequences = {}
    for entry in entries:
        sequences.setdefault(entry["sequence_name"], []).append(entry)
    return {name: sorted(frames, key=lambda e: e["frame_number"]) for name, frames in sequences.items()}


def read_co3d(path, annotations=None, frame_numbers=None):
    """CO3D v2, one sequence folder <root>/<category>/<sequence>: dict as read_re10k's, with sizes [(H, W)] from
    the annotations. annotations: read_co3d_annotations of its category (read here if None);
    frame_numbers: keep only these frames (a set list's)."""
    path = os.path.normpath(path)
    category_dir, name = os.path.split(path)
    root = os.path.dirname(category_dir)
    annotation_file = os.path.join(category_dir, "frame_annotations.jgz")
    entries = (annotations or read_co3d_annotations(category_dir)).get(name)
    if not entries:
        raise bad(annotation_file, f"has no frames of sequence {name!r}")
    if frame_numbers is not None:
        entries = [e for e in entries if e["frame_number"] in frame_numbers]
    c2w, K, files, sizes = [], [], [], []
    for e in entries:
        H, W = e["image"]["size"]
        pose, k = co3d_camera(e["viewpoint"], H, W, annotation_file, e["frame_number"])
        c2w.append(pose), K.append(k), sizes.append((H, W))
        files.append(os.path.join(root, e["image"]["path"]))
    return {"name": name, "c2w": np.stack(c2w), "K": np.stack(K), "files": files, "sizes": sizes,
            "annotations": annotation_file}


def read_blender(path):
    """NeRF-synthetic, one transforms_*.json: dict as read_re10k's, sizes None (read from the first frame)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a transforms_*.json)")
    try:
        with open(path) as f:
            meta = json.load(f)
        angle, frames = float(meta["camera_angle_x"]), meta["frames"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise bad(path, "expected JSON with camera_angle_x and a list of frames "
                        "(file_path, transform_matrix)") from None
    if not frames:
        raise bad(path, "has no frames")
    folder = os.path.dirname(path)
    c2w, files = [], []
    for i, frame in enumerate(frames):
        pose = np.array(frame["transform_matrix"], dtype=np.float64)
        if pose.shape != (4, 4):
            raise bad(path, f"frame {i}: transform_matrix must be 4x4, got shape {pose.shape}")
        check_pose(pose, path, i)
        c2w.append(pose @ OPENCV_FROM_OPENGL)
        file = os.path.normpath(os.path.join(folder, frame["file_path"]))
        files.append(file if os.path.splitext(file)[1] else file + ".png")
    check_files(files, path)
    W, H = Image.open(files[0]).size  # square pixels: fy in pixels is fx in pixels
    fx = 0.5 / math.tan(angle / 2)
    K = np.repeat(intrinsics(fx, fx * W / H, 0.5, 0.5)[None], len(files), axis=0)
    return {"name": os.path.basename(folder), "c2w": np.stack(c2w), "K": K, "files": files, "sizes": None,
            "context": meta.get("context_frame")}


READERS = {"re10k": read_re10k, "co3d": read_co3d, "blender": read_blender}


def read_cameras(path, format):
    """One sequence's cameras and frame files, in our convention (see the module docstring)."""
    if format not in READERS:
        raise ValueError(f"unknown format {format!r}: expected one of {', '.join(READERS)}")
    seq = READERS[format](path)
    check_files(seq["files"], path)
    return seq


def check_files(files, source):
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: missing frame of {source}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


# -----------------------------------------------------------------------------
# Images


def crop_and_resize(image, K, size):
    """Centre-crop image (C, H, W) to a square and resize it to size x size; K (3, 3) normalised, adjusted."""
    H, W = image.shape[-2:]
    c = min(H, W)
    y0, x0 = (H - c) // 2, (W - c) // 2
    image = image[:, y0:y0 + c, x0:x0 + c]
    K = K.clone()
    K[0, 0], K[0, 2] = K[0, 0] * W / c, (K[0, 2] * W - x0) / c
    K[1, 1], K[1, 2] = K[1, 1] * H / c, (K[1, 2] * H - y0) / c
    if c != size:  # normalised coordinates are unchanged by a resize (align_corners=False keeps pixel centres)
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=c > size)[0]
    return image, K


def read_image(path):
    """An image file -> (3, H, W) float in [0, 1]; RGBA is composited over black (premultiplied by alpha)."""
    with Image.open(path) as im:
        rgba = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
        array = np.asarray(im.convert("RGBA" if rgba else "RGB"), dtype=np.float32) / 255
    image = torch.from_numpy(array).permute(2, 0, 1)
    return image[:3] * image[3:] if rgba else image


def load_frames(seq, indices=None, size=None):
    """The frames `indices` (default all) of a sequence: images (n, 3, h, w) in [-1, 1] and K (n, 3, 3),
    centre-cropped and resized to size x size if size is given. Every frame must have the size its
    annotation says (CO3D), or else the size of the sequence's first frame."""
    indices = range(len(seq["files"])) if indices is None else indices
    expected = seq["sizes"] or [Image.open(seq["files"][0]).size[::-1]] * len(seq["files"])
    source = seq.get("annotations") or f"the sequence's first frame {seq['files'][0]}"
    images, Ks = [], []
    for i in indices:
        image, K = read_image(seq["files"][i]), torch.as_tensor(seq["K"][i], dtype=torch.float32)
        if tuple(image.shape[-2:]) != tuple(expected[i]):
            (h, w), (H, W) = image.shape[-2:], expected[i]
            raise bad(seq["files"][i], f"the image is {w}x{h} (WxH), but {source} says {W}x{H}")
        if size is not None:
            image, K = crop_and_resize(image, K, size)
        images.append(2 * image - 1)
        Ks.append(K)
    return torch.stack(images), torch.stack(Ks)


def load_scene(path, format, size=None):
    """One sequence of posed images, in our convention (see the module docstring): dict c2w (N, 4, 4),
    K (N, 3, 3), images (N, 3, H, W) in [-1, 1], files [N]. At the size on disk unless size is given;
    then centre-cropped to a square and resized to size x size, with K following the crop."""
    seq = read_cameras(path, format)
    images, K = load_frames(seq, size=size)
    return {"c2w": torch.as_tensor(seq["c2w"], dtype=torch.float32), "K": K, "images": images, "files": seq["files"]}


# -----------------------------------------------------------------------------
# Writers: the exact inverses of the readers


def to_uint8(image):
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8 numpy."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def write_re10k(path, c2w, K, images, timestamps=None, ext=".png"):
    """Write <split>/<sequence>.txt and its frames: c2w (N, 4, 4), K (N, 3, 3) normalised, images (N, 3, H, W)."""
    folder = os.path.splitext(path)[0]
    os.makedirs(folder, exist_ok=True)
    timestamps = timestamps if timestamps is not None else [1000 * (i + 1) for i in range(len(c2w))]
    lines = ["https://www.youtube.com/watch?v=written-by-dfm"]
    for ts, pose, k, image in zip(timestamps, c2w, K, images):
        w2c = torch.linalg.inv(pose.double())[:3].flatten().tolist()
        numbers = [k[0, 0], k[1, 1], k[0, 2], k[1, 2], 0.0, 0.0, *w2c]
        lines.append(f"{ts} " + " ".join(f"{float(x):.10g}" for x in numbers))
        Image.fromarray(to_uint8(image)).save(os.path.join(folder, f"{ts}{ext}"))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_co3d(root, category, sequence, c2w, K, images):
    """Write <root>/<category>/<sequence>/images/frameNNNNNN.png and add the sequence's entries to
    <root>/<category>/frame_annotations.jgz (ndc_isotropic intrinsics, PyTorch3D R and T)."""
    category_dir = os.path.join(root, category)
    os.makedirs(os.path.join(category_dir, sequence, "images"), exist_ok=True)
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
        Image.fromarray(to_uint8(image)).save(os.path.join(root, rel))
        entries.append({"sequence_name": sequence, "frame_number": i, "frame_timestamp": i / 30,
                        "image": {"path": rel, "size": [H, W]},
                        "viewpoint": {"R": (OPENCV_FROM_PYTORCH3D @ w2c[:3, :3]).T.tolist(),
                                      "T": (OPENCV_FROM_PYTORCH3D @ w2c[:3, 3]).tolist(),
                                      "focal_length": [float(k[0, 0]) * W / s, float(k[1, 1]) * H / s],
                                      "principal_point": [(W / 2 - float(k[0, 2]) * W) / s,
                                                          (H / 2 - float(k[1, 2]) * H) / s],
                                      "intrinsics_format": "ndc_isotropic"}})
    with gzip.open(path, "wt") as f:
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
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    frames = []
    for i, (pose, image) in enumerate(zip(c2w, images)):
        rgb = to_uint8(image)
        if alpha is not None:
            rgb = np.concatenate([rgb, (alpha[i].clamp(0, 1) * 255).round().byte().numpy()[..., None]], axis=-1)
        Image.fromarray(rgb).save(os.path.join(folder, split, f"r_{i}.png"))
        frames.append({"file_path": f"./{split}/r_{i}",
                       "transform_matrix": (pose.double().numpy() @ OPENCV_FROM_OPENGL).tolist()})
    meta = {"camera_angle_x": 2 * math.atan(0.5 / fx), "frames": frames}
    if context_frame is not None:
        meta["context_frame"] = context_frame
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)

