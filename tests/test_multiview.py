"""Posed images on disk: a known scene written in each format, read back into our cameras.

The known scene is two spheres of the 3D toy's world (exact ray casting), a red one on the
right and a blue one on the left of the first camera. Each test renders it from cameras with
an off-centre principal point, writes the renders in a format, loads them with
formats.load_scene and checks that the cameras round-trip, that the spheres' centres
reproject onto their own colour, and that rendering the scene from the loaded cameras
reproduces the loaded images.
"""
import gzip
import json
import math
import os

import pytest
import torch

from posed_images import formats, writers
import render
from toy_problems import scenes3d_world as world_lib

RED, BLUE = 0, 2  # palette indices; the red sphere is at +x, the blue one at -x
AZIMUTHS_DEG = (-125.0, -105.0, -90.0, -75.0, -55.0)  # both spheres in view and apart in every one


def known_scene(n=1):
    xy = torch.tensor([[[0.45, -0.2], [-0.45, 0.3]]])  # (1, M, 2)
    colours = torch.tensor([[RED, BLUE]])
    scene = world_lib.make_scenes(xy, torch.tensor([[0.35, 0.3]]), colours, colours)
    return {k: v.expand(n, *v.shape[1:]) for k, v in scene.items()}


def known_cameras(H, W, centred=False):
    """Cameras of the toy's ring, with square pixels and (unless centred) an off-centre principal point."""
    c2w = world_lib.cameras(torch.tensor(AZIMUTHS_DEG) * math.pi / 180)["c2w"]  # (N, 4, 4)
    f = 0.8 * max(H, W)  # in pixels
    cx, cy = (W / 2, H / 2) if centred else (W / 2 + 1.5, H / 2 - 2.0)
    K = torch.tensor([[f / W, 0.0, cx / W], [0.0, f / H, cy / H], [0.0, 0.0, 1.0]]).expand(len(c2w), 3, 3)
    return c2w, K.clone()


def render_known(c2w, K, H, W):
    """The known scene through each camera: (N, 3, H, W) in [-1, 1], and its coverage (N, H, W) (1 = not sky)."""
    traced = world_lib.trace(known_scene(len(c2w)), *[x.expand(len(c2w), -1, -1) for x in render.get_rays(
        c2w, K, render.pixel_centers(H, W))])  # rgb (N, H*W, 3), part (N, H*W)
    images = (2 * traced["rgb"] - 1).transpose(1, 2).reshape(len(c2w), 3, H, W)
    return images, (traced["part"] >= 0).float().view(-1, H, W)


def check_centres_reproject(scene):
    """Each sphere's centre, projected with the loaded cameras, lands on a pixel of that sphere's colour."""
    centres = known_scene()["center"][0]  # (M, 3)
    uv, depth = render.project(centres.expand(len(scene["c2w"]), -1, -1), scene["c2w"], scene["K"])  # (N, M, 2)
    H, W = scene["images"].shape[-2:]
    assert (depth > 0).all() and ((uv > 0) & (uv < 1)).all()
    for n in range(len(uv)):
        for m, channel in ((0, 0), (1, 2)):  # red: R is the largest channel; blue: B
            col, row = int(uv[n, m, 0] * W), int(uv[n, m, 1] * H)
            assert scene["images"][n, :, row, col].argmax() == channel, (n, m)


def check_renders_match(scene, atol):
    H, W = scene["images"].shape[-2:]
    images, _ = render_known(scene["c2w"], scene["K"], H, W)
    assert (images - scene["images"]).abs().max() <= atol


QUANT = 1 / 127.5 + 1e-4  # one step of 8-bit quantisation in [-1, 1]


def test_re10k_round_trips_and_crops(tmp_path):
    H, W = 36, 60  # wide, like RealEstate10K's 16:9 frames
    c2w, K = known_cameras(H, W)
    images, _ = render_known(c2w, K, H, W)
    path = str(tmp_path / "train" / "seq0.txt")
    writers.write_re10k(path, c2w, K, images)
    scene = formats.load_scene(path, "re10k")
    assert torch.allclose(scene["c2w"], c2w, atol=1e-5) and torch.allclose(scene["K"], K, atol=1e-6)
    assert scene["images"].shape == (5, 3, H, W)
    check_renders_match(scene, QUANT)
    check_centres_reproject(scene)
    cropped = formats.load_scene(path, "re10k", size=H)  # a centre crop, 12 columns off each side
    assert cropped["images"].shape == (5, 3, H, H)
    assert torch.equal(cropped["images"], scene["images"][..., 12:12 + H])
    check_renders_match(cropped, QUANT)
    check_centres_reproject(cropped)
    small = formats.load_scene(path, "re10k", size=24)  # crop and resize: K follows, the pixels are resampled
    assert torch.allclose(small["K"], cropped["K"])
    check_centres_reproject(small)
    rendered, _ = render_known(small["c2w"], small["K"], 24, 24)
    assert (rendered - small["images"]).abs().mean() < 0.05


def test_co3d_round_trips_with_non_square_images(tmp_path):
    H, W = 40, 56
    c2w, K = known_cameras(H, W)
    images, _ = render_known(c2w, K, H, W)
    writers.write_co3d(str(tmp_path), "hydrant", "seq_a", c2w, K, images)
    writers.write_co3d(str(tmp_path), "hydrant", "seq_b", c2w[:2], K[:2], images[:2])  # another sequence beside it
    scene = formats.load_scene(str(tmp_path / "hydrant" / "seq_a"), "co3d")
    assert len(scene["files"]) == 5 and all(f.startswith(str(tmp_path / "hydrant" / "seq_a")) for f in scene["files"])
    assert torch.allclose(scene["c2w"], c2w, atol=1e-5) and torch.allclose(scene["K"], K, atol=1e-6)
    assert scene["images"].shape == (5, 3, H, W)
    check_renders_match(scene, QUANT)
    check_centres_reproject(scene)
    square = formats.load_scene(str(tmp_path / "hydrant" / "seq_a"), "co3d", size=H)
    check_renders_match(square, QUANT)
    check_centres_reproject(square)


def test_co3d_reads_pytorch3d_cameras_as_the_guide_gives_them(tmp_path):
    """One hand-made annotation, converted by GUIDE section 6's formulas, not by our writer."""
    (tmp_path / "cat" / "s" / "images").mkdir(parents=True)
    H, W = 20, 30
    from PIL import Image
    Image.new("RGB", (W, H)).save(tmp_path / "cat" / "s" / "images" / "f.png")
    R = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    entry = {"sequence_name": "s", "frame_number": 0, "image": {"path": "cat/s/images/f.png", "size": [H, W]},
             "viewpoint": {"R": R, "T": [1.0, 2.0, 3.0], "focal_length": [2.0, 2.5], "principal_point": [0.1, -0.2],
                           "intrinsics_format": "ndc_isotropic"}}
    with gzip.open(tmp_path / "cat" / "frame_annotations.jgz", "wt") as f:
        json.dump([entry], f)
    scene = formats.load_scene(str(tmp_path / "cat" / "s"), "co3d")
    w2c = torch.linalg.inv(scene["c2w"][0])
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))
    assert torch.allclose(w2c[:3, :3], flip @ torch.tensor(R).T)
    assert torch.allclose(w2c[:3, 3], flip @ torch.tensor([1.0, 2.0, 3.0]))
    s = min(H, W) / 2
    expected = torch.tensor([[2.0 * s / W, 0, (W / 2 - 0.1 * s) / W], [0, 2.5 * s / H, (H / 2 + 0.2 * s) / H],
                             [0, 0, 1]])
    assert torch.allclose(scene["K"][0], expected)


def test_blender_round_trips_and_composites_rgba_over_black(tmp_path):
    H = W = 40
    c2w, K = known_cameras(H, W, centred=True)
    images, alpha = render_known(c2w, K, H, W)
    written = torch.where(alpha[:, None] > 0, images, torch.ones_like(images))  # white where transparent
    path = str(tmp_path / "lego" / "transforms_train.json")
    writers.write_blender(path, c2w, K, written, alpha=alpha)
    meta = json.load(open(path))
    assert meta["frames"][0]["file_path"] == "./train/r_0"  # no extension, as NeRF-synthetic writes it
    scene = formats.load_scene(path, "blender")
    assert torch.allclose(scene["c2w"], c2w, atol=1e-5) and torch.allclose(scene["K"], K, atol=1e-6)
    check_renders_match(scene, QUANT)  # the sky is black again: composited over black
    check_centres_reproject(scene)


def test_blender_converts_opengl_axes():
    """A camera at +z looking down at the origin, in OpenGL axes (the identity rotation looks along -z)."""
    gl = torch.eye(4, dtype=torch.float64)
    gl[2, 3] = 4.0
    cv = gl.numpy() @ formats.OPENCV_FROM_OPENGL
    uv, depth = render.project(torch.zeros(1, 3), torch.tensor(cv, dtype=torch.float32), torch.eye(3))
    assert depth.item() == pytest.approx(4.0)  # in front, at distance 4
    up = render.project(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor(cv, dtype=torch.float32), torch.eye(3))[0]
    assert up[0, 1] < 0  # world +y (OpenGL's image up) is up in the image: smaller v


# -----------------------------------------------------------------------------
# Bad input: one line naming the file and what was expected


def written_re10k(tmp_path, n=3):
    c2w, K = known_cameras(12, 16)
    images, _ = render_known(c2w[:n], K[:n], 12, 16)
    path = str(tmp_path / "train" / "seq0.txt")
    writers.write_re10k(path, c2w[:n], K[:n], images)
    return path


def edit_line(path, number, edit):
    lines = open(path).read().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    open(path, "w").write("\n".join(lines) + "\n")


def test_a_missing_frame_is_named(tmp_path):
    path = written_re10k(tmp_path)
    os.remove(tmp_path / "train" / "seq0" / "2000.png")
    with pytest.raises(FileNotFoundError, match=r"seq0/2000\.png: missing frame of .*seq0\.txt"):
        formats.load_scene(path, "re10k")


def test_a_camera_line_with_the_wrong_number_of_columns_is_named(tmp_path):
    path = written_re10k(tmp_path)
    edit_line(path, 3, lambda line: line.rsplit(" ", 1)[0])  # drop the last column of the second camera
    with pytest.raises(ValueError, match=r"seq0\.txt: line 3 has 18 columns; expected 19"):
        formats.load_scene(path, "re10k")


def test_a_non_invertible_pose_is_named(tmp_path):
    path = written_re10k(tmp_path)
    edit_line(path, 2, lambda line: " ".join(line.split()[:7] + ["0"] * 12))
    with pytest.raises(ValueError, match=r"seq0\.txt: the pose on line 2 is not invertible"):
        formats.load_scene(path, "re10k")
    c2w, K = known_cameras(8, 8, centred=True)
    c2w[1, :3, :3] *= 2  # a scaled camera: invertible, but not a rigid pose
    blender = str(tmp_path / "b" / "transforms_train.json")
    writers.write_blender(blender, c2w, K, torch.zeros(len(c2w), 3, 8, 8))
    with pytest.raises(ValueError, match=r"transforms_train\.json: the pose of frame 1 is not a rotation"):
        formats.load_scene(blender, "blender")


def test_an_image_whose_size_disagrees_with_its_annotation_is_named(tmp_path):
    c2w, K = known_cameras(10, 14)
    writers.write_co3d(str(tmp_path), "cat", "s", c2w, K, torch.zeros(len(c2w), 3, 10, 14))
    from PIL import Image
    Image.new("RGB", (14, 12)).save(tmp_path / "cat" / "s" / "images" / "frame000002.png")
    with pytest.raises(ValueError, match=r"frame000002\.png: the image is 14x12 \(WxH\), but .*frame_annotations"
                                         r"\.jgz says 14x10"):
        formats.load_scene(str(tmp_path / "cat" / "s"), "co3d")


def test_an_unknown_format_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'colmap': expected one of re10k, co3d, blender"):
        formats.load_scene(str(tmp_path), "colmap")
