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
Each reader's exact inverse, its writer, is in posed_images/writers.py.

Bad data is refused in one line naming the file, the frame or line, and what was expected (a ValueError,
or a FileNotFoundError for a missing file): the readers check every camera (finite numbers, a rigid pose,
positive focal lengths, the principal point inside the image), and load_frames decodes every frame whole
and checks it against the sequence's first (size, channels, bit depth). dataset.py does both once, when it
indexes and caches a data set, so that no bad frame reaches training. A folder that posed_images/meshes.py
has not finished building (UNFINISHED in it or above it) is refused with the command that finishes it.
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
UNFINISHED = "UNFINISHED.txt"  # in a folder still being built (posed_images/meshes.py): the command that finishes it


def bad(path, what):
    """The one-line error for a file that is not what its format expects."""
    return ValueError(f"{path}: {what}")


def numbers(value, shape):
    """value (nested lists of numbers) as a float64 array of this shape, or None if it is not one."""
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):  # strings, ragged lists
        return None
    return array if array.shape == shape else None


def check_pose(c2w, path, frame):
    """c2w (4, 4) numpy must be finite, a rotation and a translation (the renderer assumes one), last row 0 0 0 1."""
    R = c2w[:3, :3]
    if not np.isfinite(c2w).all():
        raise bad(path, f"the pose of frame {frame} has a value that is not finite (nan or inf)")
    if abs(np.linalg.det(R)) < 1e-6:
        raise bad(path, f"the pose of frame {frame} is not invertible (expected a rotation and a translation)")
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
        raise bad(path, f"the pose of frame {frame} is not a rotation (scaled, sheared or mirrored axes); expected "
                        "a rigid pose")
    if np.abs(c2w[3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-6:
        raise bad(path, f"the pose of frame {frame} has last row {c2w[3].tolist()}; expected 0 0 0 1")


def intrinsics(fx, fy, cx, cy, path, where):
    """K (3, 3) of normalised intrinsics, which must be finite, with fx, fy > 0 and the principal point in the image
    (a zero focal length makes K singular, and a NaN one turns every ray into NaN)."""
    if not (all(math.isfinite(v) for v in (fx, fy, cx, cy)) and fx > 0 and fy > 0 and 0 < cx < 1 and 0 < cy < 1):
        raise bad(path, f"the intrinsics {where} are fx {fx:g}, fy {fy:g}, cx {cx:g}, cy {cy:g} (normalised by the "
                        "image size); expected finite numbers, fx and fy > 0, and 0 < cx, cy < 1")
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def check_finished(paths):
    """Refuse paths (files or folders) that lie in an unfinished build: a folder with UNFINISHED in it or above it."""
    checked = set()
    for path in paths:
        folder = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
        while folder not in checked:
            checked.add(folder)
            marker = os.path.join(folder, UNFINISHED)
            if os.path.isfile(marker):
                with open(marker) as f:
                    command = f.read().strip()
                raise ValueError(f"{folder}: an unfinished data set (its build was interrupted); finish it with: "
                                 f"{command}")
            folder = os.path.dirname(folder)


# -----------------------------------------------------------------------------
# Readers: one sequence's cameras and frame files (images are read by load_frames)


def read_re10k(path):
    """RealEstate10K: dict name, c2w (N, 4, 4), K (N, 3, 3), files [N], sizes None (any size, read from the frames)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such camera file (expected <split>/<sequence>.txt)")
    try:
        with open(path) as f:
            lines = [(n, line.split()) for n, line in enumerate(f.read().splitlines(), start=1)
                     if line.strip() and n > 1]  # line 1: the video URL
    except UnicodeDecodeError:
        raise bad(path, "not a text file (expected a URL line, then `timestamp fx fy cx cy k1 k2` + 12 numbers "
                        "per line)") from None
    if not lines:
        raise bad(path, "no camera lines after the URL line (expected `timestamp fx fy cx cy k1 k2` + 12 numbers)")
    folder = os.path.splitext(path)[0]
    c2w, K, files = [], [], []
    for number, row in lines:
        if len(row) != 19:
            raise bad(path, f"line {number} has {len(row)} columns; expected 19: timestamp fx fy cx cy k1 k2 "
                            "and the 3x4 world-to-camera matrix row by row")
        try:
            values = [float(x) for x in row[1:]]
        except ValueError:
            raise bad(path, f"line {number} has a column that is not a number") from None
        if not all(math.isfinite(v) for v in values):
            raise bad(path, f"line {number} has a value that is not finite (nan or inf); expected numbers")
        K.append(intrinsics(*values[:4], path, f"on line {number}"))
        w2c = np.eye(4)
        w2c[:3] = np.array(values[6:]).reshape(3, 4)
        if abs(np.linalg.det(w2c[:3, :3])) < 1e-6:
            raise bad(path, f"the pose on line {number} is not invertible")
        c2w.append(np.linalg.inv(w2c))
        check_pose(c2w[-1], path, f"{row[0]} (line {number})")
        stem = os.path.join(folder, row[0])
        files.append(next((stem + ext for ext in (".png", ".jpg") if os.path.exists(stem + ext)), stem + ".png"))
    return {"name": os.path.basename(folder), "c2w": np.stack(c2w), "K": np.stack(K), "files": files, "sizes": None}


CO3D_FIELDS = {"sequence_name": str, "frame_number": int, "image": dict, "image.path": str, "image.size": list,
               "viewpoint": dict, "viewpoint.R": list, "viewpoint.T": list, "viewpoint.focal_length": list,
               "viewpoint.principal_point": list}  # what is read of CO3D's FrameAnnotation, and its type
JSON_TYPES = {str: "string", int: "integer", dict: "object", list: "list"}


def co3d_entry_problem(entry):
    """What is wrong with the keys and types of one frame annotation, or None."""
    if not isinstance(entry, dict):
        return f"is {type(entry).__name__} {entry!r:.40}; expected an object"
    for key, kind in CO3D_FIELDS.items():
        value = entry
        for part in key.split("."):  # the parents come first in CO3D_FIELDS, so value is a dict here
            value = value.get(part)
        if value is None:
            return f"has no {key} (every entry needs {', '.join(CO3D_FIELDS)})"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key} is {value!r:.40}; expected a JSON {JSON_TYPES[kind]}"
    size = entry["image"]["size"]
    if not (len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
        return f"image.size is {size!r:.40}; expected [H, W], two positive integers"
    return None


def co3d_camera(viewpoint, H, W, path, frame):
    """A CO3D viewpoint dict (PyTorch3D camera) of an H x W image -> (c2w, K) in our convention."""
    R, T = numbers(viewpoint["R"], (3, 3)), numbers(viewpoint["T"], (3,))
    focal, principal = numbers(viewpoint["focal_length"], (2,)), numbers(viewpoint["principal_point"], (2,))
    if R is None or T is None or focal is None or principal is None:
        raise bad(path, f"frame {frame}: expected viewpoint R a 3x3 list of numbers, and T, focal_length and "
                        "principal_point lists of 3, 2 and 2 numbers")
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = OPENCV_FROM_PYTORCH3D @ R.T, OPENCV_FROM_PYTORCH3D @ T
    if not np.isfinite(w2c).all():
        raise bad(path, f"the pose of frame {frame} has a value that is not finite (nan or inf)")
    if abs(np.linalg.det(w2c[:3, :3])) < 1e-6:
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
    (f0, f1), (p0, p1) = focal.tolist(), principal.tolist()
    return c2w, intrinsics(f0 * sx / W, f1 * sy / H, (W / 2 - p0 * sx) / W, (H / 2 - p1 * sy) / H, path,
                           f"of frame {frame} (focal_length {[f0, f1]}, principal_point {[p0, p1]} in NDC units)")


def read_co3d_annotations(category_dir):
    """{sequence_name: [entries sorted by frame_number]} of <category>/frame_annotations.jgz, every entry checked."""
    path = os.path.join(category_dir, "frame_annotations.jgz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a CO3D sequence <root>/<category>/<sequence> needs "
                                "<root>/<category>/frame_annotations.jgz)")
    try:
        with gzip.open(path, "rt") as f:
            entries = json.load(f)
    except (OSError, EOFError, ValueError) as e:  # not gzip, truncated, not UTF-8 or not JSON
        raise bad(path, f"not a gzipped JSON list ({e})") from None
    if not isinstance(entries, list):
        raise bad(path, f"holds a JSON {type(entries).__name__}; expected a list of frame annotations")
    sequences = {}
    for k, entry in enumerate(entries):
        problem = co3d_entry_problem(entry)
        if problem:
            raise bad(path, f"entry {k} {problem}")
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
        if not entries:
            raise bad(annotation_file, f"has none of the frames of sequence {name!r} that the set list names")
    c2w, K, files, sizes = [], [], [], []
    for e in entries:
        H, W = e["image"]["size"]
        pose, k = co3d_camera(e["viewpoint"], H, W, annotation_file, f"{e['frame_number']} of sequence {name!r}")
        c2w.append(pose), K.append(k), sizes.append((H, W))
        files.append(os.path.join(root, e["image"]["path"]))
    return {"name": name, "c2w": np.stack(c2w), "K": np.stack(K), "files": files, "sizes": sizes,
            "annotations": annotation_file}


def read_blender(path):
    """NeRF-synthetic, one transforms_*.json: dict as read_re10k's, sizes None (read from the first frame), and
    context, the frame index its context_frame key names (or None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a transforms_*.json)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:  # not UTF-8, or not JSON
        raise bad(path, f"not a JSON file ({e})") from None
    if not isinstance(meta, dict) or "camera_angle_x" not in meta or "frames" not in meta:
        raise bad(path, "expected a JSON object with camera_angle_x and frames (a list of file_path, "
                        "transform_matrix)")
    angle, frames = meta["camera_angle_x"], meta["frames"]
    if not (type(angle) in (int, float) and 0 < angle < math.pi):  # NaN fails both comparisons
        raise bad(path, f"camera_angle_x is {angle!r:.40}; expected the horizontal field of view in radians, a "
                        "finite number > 0 and below pi (180 degrees)")
    if not isinstance(frames, list) or not frames:
        raise bad(path, f"frames is {'an empty list' if frames == [] else type(frames).__name__}; expected a "
                        "list of frames, each with file_path and transform_matrix")
    folder = os.path.dirname(path)
    c2w, files = [], []
    for i, frame in enumerate(frames):
        missing = [k for k in ("file_path", "transform_matrix") if not isinstance(frame, dict) or k not in frame]
        if missing:
            raise bad(path, f"frame {i} has no {' and no '.join(missing)} (each frame needs file_path and "
                            "transform_matrix)")
        pose = numbers(frame["transform_matrix"], (4, 4))
        if pose is None:
            raise bad(path, f"frame {i}: transform_matrix is {frame['transform_matrix']!r:.40}; expected a 4x4 "
                            "list of numbers")
        if not isinstance(frame["file_path"], str) or not frame["file_path"]:
            raise bad(path, f"frame {i}: file_path is {frame['file_path']!r:.40}; expected a path relative to "
                            "the json's folder")
        check_pose(pose, path, i)
        c2w.append(pose @ OPENCV_FROM_OPENGL)
        file = os.path.normpath(os.path.join(folder, frame["file_path"]))
        files.append(file if os.path.splitext(file)[1] else file + ".png")
    context = meta.get("context_frame")
    if context is not None and not (type(context) is int and 0 <= context < len(frames)):
        raise bad(path, f"context_frame is {context!r:.40}; expected a frame index from 0 to {len(frames) - 1}")
    check_files(files, path)
    W, H, _ = image_header(files[0])  # square pixels: fy in pixels is fx in pixels
    fx = 0.5 / math.tan(angle / 2)
    K = np.repeat(intrinsics(fx, fx * W / H, 0.5, 0.5, path, "of its frames")[None], len(files), axis=0)
    return {"name": os.path.basename(folder), "c2w": np.stack(c2w), "K": K, "files": files, "sizes": None,
            "context": context}


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


COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr")  # PIL converts these to RGB(A) exactly
GREY_MODES = ("1", "L", "LA")  # 8 bits (or 1) per pixel


def pixel_kind(im):
    """What a PIL image's pixels are, as the error messages name it ("8-bit RGB with alpha", "16-bit grey"),
    or None for modes read nowhere here (32-bit integers, floats)."""
    alpha = " with alpha" if im.mode in ("RGBA", "PA", "LA") or "transparency" in im.info else ""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # older PIL opens 16-bit PNGs as I
        return "16-bit grey"
    if im.mode in COLOUR_MODES:
        return f"8-bit RGB{alpha}"
    return f"{1 if im.mode == '1' else 8}-bit grey{alpha}" if im.mode in GREY_MODES else None


def open_image(path):
    """PIL's image of a file (only its header read) and its pixel_kind; a one-line error naming the file if it is
    not an image, or of a kind not read here."""
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ... for a bad file
        raise bad(path, f"not an image PIL can read ({e})") from None
    kind = pixel_kind(im)
    if kind is None:
        im.close()
        raise bad(path, f"PIL reads it as mode {im.mode}, which is not read here; expected 8-bit RGB or grey "
                        "(with or without alpha), or 16-bit grey")
    return im, kind


def image_header(path):
    """(W, H, pixel_kind) of an image file, from its header (its pixels are not decoded)."""
    im, kind = open_image(path)
    with im:
        return *im.size, kind


def read_image(path):
    """An image file, decoded whole (a truncated file is an error naming it) -> (3, H, W) float in [0, 1]: grey is
    copied to the three channels, 16-bit values are divided by 65535 (not clipped at 255, as PIL's convert does),
    and alpha is composited over black (premultiplied)."""
    im, kind = open_image(path)
    with im:
        try:
            if kind == "16-bit grey":
                array = np.asarray(im, dtype=np.float32)[..., None].repeat(3, axis=-1) / 65535  # (H, W, 3)
            else:
                array = np.asarray(im.convert("RGBA" if kind.endswith("alpha") else "RGB"), dtype=np.float32) / 255
        except Exception as e:  # "image file is truncated", a bad checksum, ...
            raise bad(path, f"not an image PIL can read ({e})") from None
    image = torch.from_numpy(array).permute(2, 0, 1)  # (3 or 4, H, W)
    return image[:3] * image[3:] if kind.endswith("alpha") else image


def load_frames(seq, indices=None, size=None):
    """The frames `indices` (default all) of a sequence: images (n, 3, h, w) in [-1, 1] and K (n, 3, 3),
    centre-cropped and resized to size x size if size is given. Every frame is decoded whole and must be like
    the sequence's first: the size its annotation says (CO3D) or the first frame's, and its channels and bit
    depth, so that no frame is read differently from the others."""
    indices = range(len(seq["files"])) if indices is None else indices
    first = seq["files"][0]
    W0, H0, kind0 = image_header(first)
    expected = seq["sizes"] or [(H0, W0)] * len(seq["files"])
    source = seq.get("annotations") or f"the sequence's first frame {first}"
    images, Ks = [], []
    for i in indices:
        file = seq["files"][i]
        W, H, kind = image_header(file)
        if (H, W) != tuple(expected[i]):
            raise bad(file, f"the image is {W}x{H} (WxH), but {source} says {expected[i][1]}x{expected[i][0]}")
        if kind != kind0:
            raise bad(file, f"the image is {kind}, but the sequence's first frame {first} is {kind0}; expected "
                            "every frame with the same channels and bit depth")
        image, K = read_image(file), torch.as_tensor(seq["K"][i], dtype=torch.float32)
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
