"""Real geometry with an exact hidden part (posed_images/meshes.py), on meshes the tests build: the caster against
closed-form hits, the PLY reader, the colouring that makes the hidden part exact, the written set read
back by the NeRF-synthetic loader, and its scores. Only the check of the fetched pyvista meshes needs
them in the cache (tests never download)."""
import math
import os
import struct

import pytest
import torch

from posed_images import formats, mesh_files, mesh_scores, meshes
import render
from test_scenes3d import TINY, tiny_model
from toy_problems import scenes3d_world as world_lib

CUBE_VERTICES = torch.tensor([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
CUBE_QUADS = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
CUBE_FACES = torch.tensor([[q[0], q[k], q[k + 1]] for q in CUBE_QUADS for k in (1, 2)])


def test_the_caster_finds_the_exact_hits_on_a_cube():
    g = torch.Generator().manual_seed(0)
    origins = torch.nn.functional.normalize(torch.randn(400, 3, generator=g), dim=-1) * 3  # outside the cube
    aims = torch.rand(400, 3, generator=g) * 1.6 - 0.8  # some inside the cube, some past it
    dirs = torch.nn.functional.normalize(aims - origins, dim=-1)
    t, face = meshes.cast(CUBE_VERTICES, CUBE_FACES, origins, dirs, chunk=64)
    near, far = render.intersect_box(origins, dirs, torch.full((3,), -0.5), torch.full((3,), 0.5))  # closed form
    hits = far > near
    assert 50 < hits.sum() < 390  # both kinds of ray
    assert torch.equal(face >= 0, hits) and torch.isinf(t[~hits]).all()
    assert torch.allclose(t[hits], near[hits], atol=1e-5)



def test_the_tiled_caster_finds_the_same_hits_as_brute_force_from_any_camera():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(300, 1, 3, generator=g) * 1.6 - 0.8
    vertices = (centres + 0.15 * torch.randn(300, 3, 3, generator=g)).reshape(-1, 3)  # a soup of small triangles
    faces = torch.arange(900).view(300, 3)
    for azimuth, elevation in ((0.0, 25.0), (137.0, -40.0), (250.0, 80.0)):
        c2w, K = meshes.camera(azimuth, elevation, 16)
        uv = torch.rand(500, 2, generator=g) * 1.2 - 0.1  # inside the image, and a little outside it
        origins, dirs = render.get_rays(c2w, K, uv)
        t, face = meshes.cast(vertices, faces, origins.expand_as(dirs), dirs)
        t_tiled, face_tiled = meshes.cast_from_camera(vertices, faces, c2w, K, uv)
        inside = ((uv >= 0) & (uv <= 1)).all(-1)  # the tiles cover the image; outside it only the nearest tile's
        assert 100 < (face[inside] >= 0).sum() < inside.sum()  # some rays hit, some miss
        assert torch.equal(face_tiled[inside], face[inside]) and torch.equal(t_tiled[inside], t[inside])


def ply(binary):
    """A tetrahedron plus a quad (split into two triangles), as PLY bytes."""
    vertices = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)]
    faces = [(0, 2, 1), (0, 1, 3), (0, 3, 2), (1, 2, 3), (1, 4, 2, 0)]
    header = (f"ply\nformat {'binary_little_endian' if binary else 'ascii'} 1.0\nelement vertex {len(vertices)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n").encode()
    if binary:
        body = b"".join(struct.pack("<3f", *v) for v in vertices)
        body += b"".join(struct.pack(f"<B{len(f)}i", len(f), *f) for f in faces)
    else:
        body = "".join(" ".join(map(str, v)) + "\n" for v in vertices).encode()
        body += "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in faces).encode()
    return header + body


@pytest.mark.parametrize("binary", [False, True])
def test_ply_files_are_read_and_polygons_split_into_triangles(binary):
    vertices, faces = mesh_files.read_ply(ply(binary))
    assert vertices.shape == (5, 3) and vertices[4].tolist() == [1.0, 1.0, 0.0]
    assert faces.tolist()[-2:] == [[1, 4, 2], [1, 2, 0]] and faces.shape == (6, 3)


def test_obj_files_of_several_objects_are_read_with_every_index_form_and_polygons_split():
    obj = (b"# two objects\no first\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvn 0 0 1\nf 1/1/1 2/1/1 3/1/1\n"
           b"o second\nv 0 0 1\nv 1 1 1\nf -2//1 -1//1 2 1\n")  # a quad with negative and plain indices
    vertices, faces = mesh_files.read_obj(obj)
    assert vertices.shape == (5, 3) and vertices[4].tolist() == [1.0, 1.0, 1.0]
    assert faces.tolist() == [[0, 1, 2], [3, 4, 1], [3, 1, 0]]


def test_the_context_sees_only_the_seen_colour_and_the_far_side_shows_the_hidden_part():
    g = torch.Generator().manual_seed(1)
    vertices = meshes.place(CUBE_VERTICES, g)
    ctxt_c2w, ctxt_K = meshes.camera(30.0, 25.0, 24)
    _, part = meshes.render_mesh(vertices, CUBE_FACES, ctxt_c2w, ctxt_K, 24, ctxt_c2w, ctxt_K)
    assert (part == 0).sum() > 50 and not (part == 1).any()  # every point the context image shows is seen
    far_c2w, far_K = meshes.camera(210.0, 25.0, 24)
    _, far = meshes.render_mesh(vertices, CUBE_FACES, far_c2w, far_K, 24, ctxt_c2w, ctxt_K)
    assert (far == 1).sum() > 50  # a convex body: what the far camera sees is mostly what the context cannot
    # a point is seen exactly when its face points towards the context camera (a convex body hides nothing else)
    origins, dirs = render.get_rays(far_c2w, far_K, render.pixel_centers(24, 24))
    t, face = meshes.cast(vertices, CUBE_FACES, origins, dirs)
    a, b, c = vertices[CUBE_FACES[face.clamp(min=0)]].unbind(1)
    outward = torch.linalg.cross(b - a, c - a)  # the cube's faces wind outwards
    point = origins + t.nan_to_num(posinf=0)[:, None] * dirs
    facing = ((ctxt_c2w[:3, 3] - point) * outward).sum(-1) > 0
    ok = face >= 0
    clear = ok & (((ctxt_c2w[:3, 3] - point) * torch.nn.functional.normalize(outward, dim=-1)).sum(-1).abs() > 0.05)
    assert torch.equal((far.view(-1) == 0)[clear], facing[clear])


def test_a_scene_is_written_as_nerf_synthetic_and_read_back_with_its_exact_posterior(tmp_path):
    scene = meshes.draw_scene(CUBE_VERTICES, 4, torch.Generator().manual_seed(2))
    vertices = scene["vertices"]
    seen, hidden = meshes.write_scene(str(tmp_path / "scene"), scene, CUBE_FACES, 16)
    train = formats.load_scene(str(tmp_path / "scene" / "transforms_train.json"), "blender")
    test = formats.load_scene(str(tmp_path / "scene" / "transforms_test.json"), "blender")
    posterior = torch.load(tmp_path / "scene" / "posterior.pt", weights_only=True)
    assert train["images"].shape == (4, 3, 16, 16) and test["images"].shape == (5, 3, 16, 16)  # 3 far, 2 near
    for scene in (train, test):  # rendering the mesh from the loaded cameras gives the loaded images
        for c2w, K, image in zip(scene["c2w"], scene["K"], scene["images"]):
            shade, part = meshes.render_mesh(vertices, CUBE_FACES, c2w, K, 16, train["c2w"][0], train["K"][0])
            assert (meshes.paint(shade, part, seen, hidden) - image).abs().max() <= 1 / 127.5 + 1e-4
    assert torch.allclose(posterior["palette_renders"][:, hidden], test["images"][:3], atol=1 / 127.5 + 1e-4)
    # the near views: the context decides every pixel but the hidden part, whose colour only those pixels show
    keep = posterior["near_seen"]  # (2, S, S)
    assert keep.shape == (2, 16, 16) and keep.float().mean() > 0.5
    for h in range(len(meshes.PALETTE)):  # another hidden colour changes the near views on hidden pixels only
        for j, (c2w, K) in enumerate(zip(test["c2w"][3:], test["K"][3:])):
            shade, part = meshes.render_mesh(vertices, CUBE_FACES, c2w, K, 16, train["c2w"][0], train["K"][0])
            other = meshes.paint(shade, part, seen, h)
            assert (other - test["images"][3 + j])[:, keep[j]].abs().max() <= 1 / 127.5 + 1e-4
    assert posterior["hidden"].shape == (3, 16, 16) and posterior["hidden"][0].sum() > 0
    # scored as the toy's back colours are: the true far view is its own hidden colour, sharply
    scores = world_lib.hidden_colour_scores(test["images"][:1, None], posterior["hidden"][:1, None],
                                            posterior["palette_renders"][:1])
    assert scores["nearest"].item() == hidden and scores["sharp"] == 1 and scores["tv"] == 0.75
    assert json_context(tmp_path / "scene" / "transforms_train.json") == 0  # training always uses frame 0 as context


def json_context(path):
    import json
    return json.load(open(path))["context_frame"]


def test_hidden_scores_run_on_a_built_test_set_and_building_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("toy_problems.scenes3d", fromlist=["x"]).SETTINGS, "scenes3d", TINY)
    cube = {"cube": (CUBE_VERTICES, CUBE_FACES)}
    meshes.build(str(tmp_path / "set"), n_scenes=2, n_views=3, size=32, seed=0, meshes=cube, progress=False,
                 split="test")
    assert sorted(os.listdir(tmp_path)) == ["set"]  # built in set.partial, renamed when complete
    with pytest.raises(ValueError, match="already exists; choose a new folder"):
        meshes.build(str(tmp_path / "set"), n_scenes=1, meshes=cube, progress=False)
    # a model of the toy's scenes (trained on no data set) scored on held-out meshes
    scores = mesh_scores.hidden_scores(tiny_model(), str(tmp_path / "set"), "", n_scenes=2, n_samples=2, steps=2)
    assert scores["scenes"] == 2 and 0 <= scores["hidden_tv"] <= 0.75 and 0 <= scores["hidden_tv_floor"] <= 0.75
    assert 0 <= scores["sharp"] <= 1 and 0 <= scores["consistent"] <= 1 and math.isfinite(scores["psnr_context"])
    assert math.isfinite(scores["psnr_near"]) and -1 <= scores["ssim_context"] <= 1 and "lpips_context" in scores
    # a test set written before the near cameras is refused with the command that rebuilds it
    path = tmp_path / "set" / "scene_000" / "posterior.pt"
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "near_seen"}, path)
    with pytest.raises(ValueError, match="no near cameras beside the far ones.*--split test"):
        mesh_scores.hidden_scores(tiny_model(), str(tmp_path / "set"), "", n_scenes=2, n_samples=2, steps=2)


def test_the_registry_meshes_are_never_fetched_in_tests_and_read_when_cached(tmp_path):
    with pytest.raises(RuntimeError, match="DFM_NO_DOWNLOAD=1 forbids fetching"):
        mesh_files.fetch_meshes(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown mesh 'teapot'; the meshes are airplane, ant"):
        mesh_files.fetch_meshes(("duck", "teapot"), cache_dir=str(tmp_path))
    cached = os.listdir(mesh_files.DEFAULT_CACHE) if os.path.isdir(mesh_files.DEFAULT_CACHE) else []
    if len(cached) < len(mesh_files.NAMES):
        pytest.skip(f"the meshes are not cached in {mesh_files.DEFAULT_CACHE} (python -m posed_images.meshes fetches "
                    "them)")
    found = mesh_files.fetch_meshes()
    assert {n: tuple(f.shape) for n, (_, f) in found.items()} == {
        "airplane": (2452, 3), "ant": (912, 3), "nut": (1046, 3), "bunny": (902, 3), "duck": (4212, 3),
        "teddy": (2432, 3), "mug": (864, 3), "torus": (1002, 3)}
    for name, (vertices, faces) in found.items():  # every face indexes a vertex
        assert faces.min() >= 0 and faces.max() < len(vertices), name


def test_a_set_of_chosen_meshes_fetches_only_those_and_records_them(tmp_path, monkeypatch):
    asked = []

    def fetch(names):
        asked.append(tuple(names))
        return {n: (CUBE_VERTICES * (1 + k), CUBE_FACES) for k, n in enumerate(names)}
    monkeypatch.setattr(mesh_files, "fetch_meshes", fetch)
    meshes.build(str(tmp_path / "set"), n_scenes=2, n_views=2, size=8, names=("torus", "duck"), progress=False,
                 split="test")
    _, manifest = meshes.read_manifest(str(tmp_path / "set"))
    assert asked == [("torus", "duck")] and manifest["meshes"] == ["duck", "torus"]
    assert manifest["command"].endswith("--split test --meshes torus duck")
    assert manifest["source"] == ["pybullet==3.2.7"]
    with pytest.raises(ValueError, match="--meshes must name some of airplane, ant, nut, bunny"):
        meshes.build(str(tmp_path / "other"), n_scenes=1, names=("teapot",), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["set"]  # the refusal made no folder
