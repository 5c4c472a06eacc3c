"""Bad data sets get one clear line: each test writes a tiny data set with writers.write_*, spoils one thing, and
checks that reading it (or training on it) stops with a line naming the file, the frame or line, and what was
expected; and that an interrupted posed_images/meshes.py build leaves no data set behind that anything reads."""
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from posed_images import dataset, formats, mesh_files, meshes, writers
from test_meshes import CUBE_FACES, CUBE_VERTICES
from test_multiview import edit_line, known_cameras, written_re10k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_images(n, H=8, W=8):
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (n, 3, H, W) in [-1, 1]


def written_blender(tmp_path, n=3):
    """A NeRF-synthetic scene of n random 8x8 frames; returns the path of its transforms_train.json."""
    c2w, K = known_cameras(8, 8, centred=True)
    path = str(tmp_path / "scene" / "transforms_train.json")
    writers.write_blender(path, c2w[:n], K[:n], random_images(n))
    return path


def edit_json(path, edit):
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)  # NaN is written as NaN, which json.load reads back


def one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


def frame(path, i):
    return os.path.join(os.path.dirname(path), "train", f"r_{i}.png")


def truncate(file):
    data = open(file, "rb").read()
    open(file, "wb").write(data[:len(data) // 2])


# -----------------------------------------------------------------------------
# NeRF-synthetic


def set_pose(i, value):
    def edit(meta):
        meta["frames"][i]["transform_matrix"] = value
    return edit


def mirrored(meta):
    meta["frames"][1]["transform_matrix"][0] = [-x for x in meta["frames"][1]["transform_matrix"][0]]


ANGLE = "camera_angle_x is {}; expected the horizontal field of view in radians, a finite number > 0 and below pi"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(camera_angle_x=0), ANGLE.format("0")),
    (lambda m: m.update(camera_angle_x=-0.5), ANGLE.format("-0.5")),
    (lambda m: m.update(camera_angle_x=3.2), ANGLE.format("3.2")),
    (lambda m: m.update(camera_angle_x=float("nan")), ANGLE.format("nan")),
    (lambda m: m.update(camera_angle_x="wide"), ANGLE.format("'wide'")),
    (lambda m: m.update(frames={"r_0": {}}), "frames is dict; expected a list of frames, each with file_path and"),
    (lambda m: m["frames"][1].pop("transform_matrix"), r"frame 1 has no transform_matrix \(each frame needs"),
    (lambda m: m["frames"][0].pop("file_path"), "frame 0 has no file_path"),
    (lambda m: m["frames"][2].update(file_path=3), "frame 2: file_path is 3; expected a path relative to"),
    (set_pose(1, [[1, 0, 0, 0]] * 3), "frame 1: transform_matrix is .*; expected a 4x4 list of numbers"),
    (set_pose(1, "identity"), "frame 1: transform_matrix is 'identity'; expected a 4x4 list of numbers"),
    (lambda m: m["frames"][1]["transform_matrix"][0].__setitem__(3, float("nan")),
     "the pose of frame 1 has a value that is not finite"),
    (set_pose(2, np.diag([1.0, 1.0, 0.0, 1.0]).tolist()), "the pose of frame 2 is not invertible"),
    (mirrored, "the pose of frame 1 is not a rotation \\(scaled, sheared or mirrored axes\\)"),
    (lambda m: m["frames"][0]["transform_matrix"][3].__setitem__(0, 0.5), "the pose of frame 0 has last row"),
    (lambda m: m.update(context_frame=3), "context_frame is 3; expected a frame index from 0 to 2"),
    (lambda m: m.update(context_frame=-1), "context_frame is -1; expected a frame index from 0 to 2"),
    (lambda m: m.update(context_frame="0"), "context_frame is '0'; expected a frame index"),
])
def test_a_bad_transforms_json_is_named_with_what_was_expected(tmp_path, edit, message):
    path = written_blender(tmp_path)
    edit_json(path, edit)
    with pytest.raises(ValueError, match=r"transforms_train\.json: " + message) as error:
        formats.read_cameras(path, "blender")
    one_line(error)


def test_a_text_file_as_the_first_frame_is_named(tmp_path):
    path = written_blender(tmp_path)
    open(frame(path, 0), "w").write("not an image")
    with pytest.raises(ValueError, match=r"train/r_0\.png: not an image PIL can read \(cannot identify") as error:
        formats.read_cameras(path, "blender")  # the first frame's size is read for the focal length in y
    one_line(error)


def test_a_truncated_later_frame_is_named_and_never_cached(tmp_path, monkeypatch):
    path = written_blender(tmp_path)
    truncate(frame(path, 2))
    with pytest.raises(ValueError, match=r"train/r_2\.png: not an image PIL can read \(image file is truncated"):
        formats.load_scene(path, "blender")
    monkeypatch.setattr(dataset, "DEFAULT_CACHE", str(tmp_path / "cache"))
    for workers in (0, 1):  # read in this process, or in a DataLoader worker
        with pytest.raises(ValueError, match=r"train/r_2\.png: not an image PIL can read") as error:
            dataset.SceneSet(os.path.dirname(os.path.dirname(path)), "blender", 8, workers=workers, progress=False)
        one_line(error)
    assert not (tmp_path / "cache").exists() or not any(files for _, _, files in os.walk(tmp_path / "cache"))


@pytest.mark.parametrize("spoil, message", [
    (lambda f: Image.new("RGB", (10, 8)).save(f), r"the image is 10x8 \(WxH\), but the sequence's first frame "
                                                  r".*r_0\.png says 8x8"),
    (lambda f: Image.new("RGBA", (8, 8)).save(f), r"the image is 8-bit RGB with alpha, but the sequence's first "
                                                  r"frame .*r_0\.png is 8-bit RGB; expected every frame with the same"),
    (lambda f: Image.new("L", (8, 8)).save(f), r"the image is 8-bit grey, but"),
    (lambda f: Image.fromarray(np.full((8, 8), 300, np.uint16)).save(f), r"the image is 16-bit grey, but"),
])
def test_frames_that_disagree_in_size_channels_or_bit_depth_are_named(tmp_path, spoil, message):
    path = written_blender(tmp_path)
    spoil(frame(path, 1))
    with pytest.raises(ValueError, match=r"train/r_1\.png: " + message) as error:
        formats.load_scene(path, "blender")
    one_line(error)


@pytest.mark.parametrize("array, mode, expected", [
    (np.full((4, 6), 30000, np.uint16), "I;16", 30000 / 65535),  # a 16-bit grey PNG: not clipped at 255
    (np.full((4, 6), 100, np.uint8), "L", 100 / 255),
    (np.stack([np.full((4, 6), 100, np.uint8), np.full((4, 6), 51, np.uint8)], -1), "LA", 100 / 255 * 51 / 255),
    (np.full((4, 6), 100, np.uint8), "P", 100 / 255),  # a palette of greys
    (np.full((4, 6, 4), [100, 100, 100, 255], np.uint8), "RGBA", 100 / 255),
])
def test_grey_16_bit_and_palette_images_read_as_their_grey_value(tmp_path, array, mode, expected):
    file = str(tmp_path / "grey.png")
    image = Image.fromarray(array)
    (image.convert("P") if mode == "P" else image).save(file)
    assert Image.open(file).mode == mode
    read = formats.read_image(file)
    assert read.shape == (3, 4, 6) and torch.allclose(read, torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_a_scene_of_16_bit_grey_frames_loads_at_its_grey_value(tmp_path):
    path = written_blender(tmp_path)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 1000 * (i + 1), np.uint16)).save(frame(path, i))
    images = formats.load_scene(path, "blender")["images"]  # (3, 3, 8, 8) in [-1, 1]
    assert torch.allclose(images.mean((1, 2, 3)), 2 * torch.tensor([1000.0, 2000.0, 3000.0]) / 65535 - 1)


def test_an_image_mode_not_read_here_is_named(tmp_path):
    file = str(tmp_path / "depth.tiff")
    Image.fromarray(np.ones((4, 6), np.float32)).save(file)
    with pytest.raises(ValueError, match=r"depth\.tiff: PIL reads it as mode F, which is not read here"):
        formats.read_image(file)


# -----------------------------------------------------------------------------
# RealEstate10K and CO3D


def set_column(column, value):
    return lambda line: " ".join(value if i == column else x for i, x in enumerate(line.split()))


@pytest.mark.parametrize("column, value, message", [
    (1, "0", "the intrinsics on line 3 are fx 0, fy .*; expected finite numbers, fx and fy > 0, and 0 < cx, cy < 1"),
    (2, "-0.8", "the intrinsics on line 3 are fx .*, fy -0.8"),
    (3, "1.5", "the intrinsics on line 3 .* cx 1.5"),
    (1, "nan", r"line 3 has a value that is not finite \(nan or inf\)"),
    (4, "inf", r"line 3 has a value that is not finite \(nan or inf\)"),
    (9, "nan", r"line 3 has a value that is not finite \(nan or inf\)"),  # in the pose
])
def test_re10k_intrinsics_must_be_finite_and_positive(tmp_path, column, value, message):
    path = written_re10k(tmp_path)
    edit_line(path, 3, set_column(column, value))
    with pytest.raises(ValueError, match=r"seq0\.txt: " + message) as error:
        formats.load_scene(path, "re10k")
    one_line(error)


def written_co3d(tmp_path, edit):
    c2w, K = known_cameras(8, 8)
    writers.write_co3d(str(tmp_path), "cat", "s", c2w[:3], K[:3], random_images(3))
    path = tmp_path / "cat" / "frame_annotations.jgz"
    with gzip.open(path, "rt") as f:
        entries = json.load(f)
    entries = edit(entries) or entries
    with gzip.open(path, "wt") as f:
        json.dump(entries, f)
    return str(tmp_path / "cat" / "s")


def set_entry(i, key, value):
    def edit(entries):
        parent = entries[i]
        *parents, last = key.split(".")
        for part in parents:
            parent = parent[part]
        if value is None:
            del parent[last]
        else:
            parent[last] = value
    return edit


ENTRY = r"frame_annotations\.jgz: entry {} "


@pytest.mark.parametrize("edit, message", [
    (set_entry(1, "viewpoint", None), ENTRY.format(1) + r"has no viewpoint \(every entry needs sequence_name, "),
    (set_entry(0, "image.size", None), ENTRY.format(0) + "has no image.size"),
    (set_entry(2, "viewpoint.focal_length", None), ENTRY.format(2) + "has no viewpoint.focal_length"),
    (set_entry(0, "image.size", "8x8"), ENTRY.format(0) + "image.size is '8x8'; expected a JSON list"),
    (set_entry(0, "image.size", [8, 0]), ENTRY.format(0) + r"image.size is \[8, 0\]; expected \[H, W\], two positive"),
    (set_entry(1, "frame_number", "1"), ENTRY.format(1) + "frame_number is '1'; expected a JSON integer"),
    (set_entry(1, "sequence_name", 7), ENTRY.format(1) + "sequence_name is 7; expected a JSON string"),
    (lambda entries: entries.__setitem__(1, "frame"), ENTRY.format(1) + "is str 'frame'; expected an object"),
    (lambda entries: {"frames": entries}, "holds a JSON dict; expected a list of frame annotations"),
    (set_entry(1, "viewpoint.focal_length", [0.0, 1.0]), r"the intrinsics of frame 1 of sequence 's' "
     r"\(focal_length \[0.0, 1.0\], principal_point .* in NDC units\) are fx 0, .*expected finite numbers, fx and fy"),
    (set_entry(2, "viewpoint.focal_length", [float("nan")] * 2), "the intrinsics of frame 2 of sequence 's'"),
    (set_entry(1, "viewpoint.principal_point", [0.0, 0.0, 0.0]), "frame 1 of sequence 's': expected viewpoint R a "
                                                                 "3x3 list of numbers, and T, focal_length and"),
    (set_entry(1, "viewpoint.T", [0.0, "x", 0.0]), "frame 1 of sequence 's': expected viewpoint R a 3x3 list"),
    (set_entry(0, "viewpoint.R", [[float("nan")] * 3] * 3), "the pose of frame 0 of sequence 's' has a value that "
                                                            "is not finite"),
])
def test_a_bad_co3d_annotation_is_named(tmp_path, edit, message):
    path = written_co3d(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as error:
        formats.load_scene(path, "co3d")
    assert "frame_annotations.jgz: " in one_line(error)


def test_a_bad_co3d_set_list_is_named(tmp_path):
    path = written_co3d(tmp_path, lambda entries: None)
    (tmp_path / "cat" / "set_lists").mkdir()
    set_list = tmp_path / "cat" / "set_lists" / "set_lists_fewview_dev.json"
    for content in ('{"train": [["s", 0]]}', "[1, 2]", "not json"):
        set_list.write_text(content)
        with pytest.raises(ValueError, match=r"set_lists_fewview_dev\.json: expected a CO3D set list"):
            dataset.find_sequences(str(set_list), "co3d", progress=False)
    set_list.write_text('{"train": [["s", 7, "cat/s/images/frame000008.png"]]}')
    with pytest.raises(ValueError, match="has none of the frames of sequence 's' that the set list names"):
        dataset.find_sequences(str(set_list), "co3d", progress=False)
    assert len(dataset.find_sequences(path, "co3d", progress=False)[0]["files"]) == 3


# -----------------------------------------------------------------------------
# From the command line: one line, status 2, nothing written


@pytest.mark.parametrize("spoil, message", [
    (lambda path: edit_json(path, lambda m: m.update(camera_angle_x=0)), "camera_angle_x is 0; expected"),
    (lambda path: truncate(frame(path, 2)), r"r_2\.png: not an image PIL can read \(image file is truncated"),
])
def test_train_py_refuses_a_bad_data_set_in_one_line_and_writes_nothing(tmp_path, spoil, message):
    path = written_blender(tmp_path)
    spoil(path)
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # the image cache (dataset.DEFAULT_CACHE) goes there
    run = subprocess.run([sys.executable, "train.py", "--problem", "scenes3d", "--data", path, "--format", "blender",
                          "--steps", "1", "--out-dir", str(tmp_path / "run"), "--no-progress"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()  # the data set is checked before the run writes anything


# -----------------------------------------------------------------------------
# posed_images/meshes.py: whole or absent


CUBE = {"cube": (CUBE_VERTICES, CUBE_FACES)}


def interrupt_at(monkeypatch, calls):
    """Ctrl-C in the middle of a scene: render_mesh raises KeyboardInterrupt at its calls-th call."""
    render, count = meshes.render_mesh, []

    def render_or_interrupt(*args):
        count.append(1)
        if len(count) == calls:
            raise KeyboardInterrupt
        return render(*args)
    monkeypatch.setattr(meshes, "render_mesh", render_or_interrupt)


def test_an_interrupted_build_leaves_no_data_set_and_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch):
    out, partial = tmp_path / "set", tmp_path / "set.partial"
    options = dict(n_scenes=3, n_views=2, size=8, seed=0, meshes=CUBE, progress=False)
    with monkeypatch.context() as m:
        interrupt_at(m, 8)  # a scene is 2 train and 3 test renders: stop in the test views of scene 1
        with pytest.raises(KeyboardInterrupt, match=f"interrupted: 1 of 3 scenes are in {partial}; finish the build "
                                                    f"with: python -m posed_images.meshes --out {out} --scenes 3 "
                                                    "--views 2 --size 8 --seed 0$"):
            meshes.build(str(out), **options)
    assert not out.exists() and sorted(os.listdir(partial)) == ["UNFINISHED.txt", "scene_000"]  # no scene_001.tmp
    # nothing reads it: not the folder, not a folder above it, not a scene in it
    for data in (partial, tmp_path, partial / "scene_000" / "transforms_train.json"):
        with pytest.raises(ValueError, match=f"{partial}: an unfinished data set .*; finish it with: python -m "
                                             f"posed_images.meshes --out {out} --scenes 3"):
            dataset.find_sequences(str(data), "blender", progress=False)
    with pytest.raises(ValueError, match="an unfinished build of other options; finish it with: python -m"):
        meshes.build(str(out), **{**options, "seed": 1})
    meshes.build(str(out), **options)  # the same options again: resumed
    assert not partial.exists() and sorted(os.listdir(out)) == ["dataset.json", "scene_000", "scene_001", "scene_002"]
    meshes.build(str(tmp_path / "whole"), **options)
    for scene in ("scene_000", "scene_002"):  # the resumed set is the uninterrupted one
        for name in ("transforms_train.json", "transforms_test.json", "train/r_1.png"):
            assert (out / scene / name).read_bytes() == (tmp_path / "whole" / scene / name).read_bytes()
    assert len(dataset.find_sequences(str(out), "blender", progress=False)) == 3


def no_network(names):
    raise RuntimeError("pip download pyvista==0.49.1 failed: no network")


def run_meshes(monkeypatch, capsys, *args, fetch=lambda names: CUBE):
    monkeypatch.setattr(mesh_files, "fetch_meshes", fetch)
    monkeypatch.setattr("sys.argv", ["meshes.py", "--scenes", "2", "--views", "2", "--size", "8", "--no-progress",
                                     *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        meshes.main()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return exit.value.code, err


def test_meshes_py_refuses_an_unusable_out_in_one_line_and_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    code, err = run_meshes(monkeypatch, capsys, "--out", file)
    assert code == 2 and err == f"error: --out '{file}' already exists as a file; choose a new folder (nothing is " \
                                "overwritten)"
    code, err = run_meshes(monkeypatch, capsys, "--out", file / "set")  # a folder that cannot be made
    assert code == 2 and err.startswith(f"error: --out '{file / 'set'}': cannot write the folder ")
    assert file.read_text() == "keep me"
    code, err = run_meshes(monkeypatch, capsys, "--out", tmp_path / "set", fetch=no_network)
    assert code == 2 and err == "error: pip download pyvista==0.49.1 failed: no network"
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # no set.partial left behind
    interrupt_at(monkeypatch, 3)
    code, err = run_meshes(monkeypatch, capsys, "--out", tmp_path / "set")
    assert code == 130 and err.startswith("interrupted: 0 of 2 scenes are in ") and "finish the build with" in err
    assert not (tmp_path / "set").exists() and os.listdir(tmp_path / "set.partial") == ["UNFINISHED.txt"]
