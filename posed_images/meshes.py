"""Real geometry with an exact hidden part: a multi-view data set of real meshes, written as NeRF-synthetic.

    python -m posed_images.meshes --out out/meshes                        # a training set (fetches 8 meshes once)
    python -m posed_images.meshes --out out/meshes-test --split test      # a test set: other scenes, held out
    python -m posed_images.meshes --out out/meshes-torus --split test --meshes torus   # a shape left out of training
    python train.py --problem scenes3d --data out/meshes --format blender
    python sample.py out/scenes3d-dfm/ckpt.pt --meshes out/meshes-test   # hidden_scores on the test set

The meshes (posed_images/mesh_files.py: pyvista's airplane, ant and nut, MIT; pybullet's bunny, duck,
teddy, mug and torus, zlib) are taken from their wheels on PyPI at run time and never copied into this
repository. Each scene is one mesh, centred, scaled to a random size and turned to a random rotation,
rendered by an exact ray-triangle caster (Moller-Trumbore, over the faces whose projection covers the ray's tile of the image) under a fixed
light against black, from cameras 4 units from its centre (NeRF-synthetic's convention). --meshes
chooses which; a test set of meshes that a training set left out measures how a model does on a shape
it never saw. The colouring makes its hidden part exact: every surface point that the context camera
(frame 0) sees is painted in one palette colour, and every point it cannot see in another, drawn
uniformly from the palette. The context image shows only seen points, so given it the hidden colour
is exactly uniform over the palette, on geometry no one here made.

Each scene folder holds transforms_train.json (frame 0 the context, named by "context_frame",
then random views all around, which show the hidden part and teach its prior),
transforms_test.json (three cameras on the far side, then two near the context camera) and
posterior.pt: for each far camera the pixels where the hidden part is in view and the renders of
the true geometry with the hidden part in every palette colour, and for each near camera the
pixels the context determines (background and seen part). mesh_scores.hidden_scores() classifies a
model's samples against those.

Train and test sets are held apart by construction: --split train (the default) draws its scenes from
toy_problems.dataset_generator(seed), --split test from held_out_generator(seed), streams that never seed a
generator alike (toy_problems.stream_seed), so no test scene is a training scene whatever the two seeds.
MANIFEST (dataset.json) at the set's root records the split, stream, seed, scenes, views, size and meshes;
train.py refuses to train on a test set, and mesh_scores.hidden_scores refuses a training set, or a set the model
trained on.

The set is built in OUT.partial and renamed to OUT when every scene is there, so OUT is complete or
absent, and train.py refuses OUT.partial. After an interruption (Ctrl-C), the same command resumes
the build: it keeps the scenes already written and renders the rest, the same ones an uninterrupted
build would.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import render
import toy_problems
from posed_images import formats, mesh_files, writers
from toy_problems import scenes3d_world as world_lib
from toy_problems.scenes3d_eval import NEAR_DEG  # the near cameras' azimuth either side of the context's

PALETTE = world_lib.WORLD.palette  # the toy's four colours
LIGHT = F.normalize(torch.tensor(world_lib.WORLD.light), dim=0)  # a fixed light, from above
AMBIENT = world_lib.WORLD.ambient
CAM_DIST, HALF_FOV_DEG = 4.0, 15.0  # the object (radius <= 1) fills most of the image
MANIFEST = "dataset.json"  # at a built set's root: which split, stream, seed, options and meshes made it
SPLITS = {"train": ("dataset", toy_problems.dataset_generator), "test": ("held_out", toy_problems.held_out_generator)}
TILES = 8  # cast_from_camera's grid: at 32x32, 4x4 pixels a tile, the fastest of 4, 8 and 16 on the duck
MIN_HIDDEN = 8  # scenes are scored when straight opposite shows this many hidden pixels (thin sheets, seen from
                # both sides, have hardly any hidden part)


# -----------------------------------------------------------------------------
# The exact ray-triangle caster


def cast(vertices, faces, origins, dirs, chunk=512):
    """The first hit of each ray on a triangle mesh (Moller & Trumbore 1997), brute force over the faces.

    vertices (V, 3), faces (F, 3); origins, dirs (R, 3) -> t (R,) the distance along dirs (inf for a miss)
    and face (R,) the index of the triangle hit (-1 for a miss)."""
    a, b, c = vertices[faces].unbind(1)  # (F, 3) each
    e1, e2 = b - a, c - a
    ts, hits = [], []
    for o, d in zip(origins.split(chunk), dirs.split(chunk)):
        p = torch.linalg.cross(d[:, None], e2[None])  # (r, F, 3)
        det = (e1[None] * p).sum(-1)  # (r, F)
        inv = 1 / torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        s = o[:, None] - a[None]  # (r, F, 3)
        u = (s * p).sum(-1) * inv
        q = torch.linalg.cross(s, e1[None].expand_as(s))
        v = (d[:, None] * q).sum(-1) * inv
        t = (e2[None] * q).sum(-1) * inv
        ok = (det.abs() > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6)
        t, face = torch.where(ok, t, torch.full_like(t, math.inf)).min(dim=1)
        ts.append(t)
        hits.append(torch.where(torch.isfinite(t), face, torch.full_like(face, -1)))
    return torch.cat(ts), torch.cat(hits)


def cast_from_camera(vertices, faces, c2w, K, uv):
    """cast() for the rays from one camera (c2w (4, 4), K (3, 3)) through image points uv (R, 2) in [0, 1]: the
    same hits, found faster by testing each ray only against the faces whose projected bounding box overlaps its
    tile of a TILES x TILES grid over the image. A ray through uv can only hit a face in front of the camera whose projection
    holds uv, so this is exact; a mesh reaching behind the camera is cast by brute force. -> t (R,), face (R,)."""
    origins, dirs = render.get_rays(c2w, K, uv)  # (R, 3)
    origins = origins.expand_as(dirs)
    corners, depth = render.project(vertices, c2w, K)  # (V, 2), (V,)
    if (depth <= 1e-6).any():
        return cast(vertices, faces, origins, dirs)
    lo, hi = corners[faces].amin(1) - 1e-4, corners[faces].amax(1) + 1e-4  # (F, 2) each, the faces' boxes
    edges = torch.arange(TILES + 1, device=uv.device) / TILES
    overlaps = (lo[..., None] <= edges[1:]) & (hi[..., None] >= edges[:-1])  # (F, 2, TILES): along u and along v
    covers = (overlaps[:, 1, :, None] & overlaps[:, 0, None, :]).flatten(1)  # (F, TILES * TILES), row-major in v
    cell = (uv.clamp(0, 1 - 1e-6) * TILES).long()  # (R, 2)
    tile = cell[:, 1] * TILES + cell[:, 0]  # (R,)
    t, face = torch.full_like(uv[:, 0], math.inf), torch.full_like(tile, -1)
    for k in tile.unique().tolist():
        rays, candidates = (tile == k).nonzero()[:, 0], covers[:, k].nonzero()[:, 0]
        if len(candidates):
            t[rays], hit = cast(vertices, faces[candidates], origins[rays], dirs[rays])
            face[rays] = torch.where(hit >= 0, candidates[hit.clamp(min=0)], hit)
    return t, face


def render_mesh(vertices, faces, c2w, K, size, ctxt_c2w, ctxt_K):
    """A mesh seen by one camera (c2w (4, 4), K (3, 3)): shade (S, S) Lambert plus ambient, part (S, S) long
    (-1 background, 0 a point the context camera (ctxt_c2w, ctxt_K) sees, 1 a point it cannot see)."""
    uv = render.pixel_centers(size, size)  # (P, 2)
    origins, dirs = render.get_rays(c2w, K, uv)  # (P, 3)
    t, face = cast_from_camera(vertices, faces, c2w, K, uv)
    hit = face >= 0
    point = origins + torch.where(hit, t, torch.zeros_like(t))[:, None] * dirs  # (P, 3)
    a, b, c = vertices[faces[face.clamp(min=0)]].unbind(1)
    normal = F.normalize(torch.linalg.cross(b - a, c - a), dim=-1)
    normal = torch.where(((normal * dirs).sum(-1) > 0)[:, None], -normal, normal)  # the side facing the ray
    shade = AMBIENT + (1 - AMBIENT) * (normal @ LIGHT).clamp(min=0)
    # seen by the context camera: in its image, in front of it, and the first thing on the ray from it
    uv, depth = render.project(point, ctxt_c2w, ctxt_K)
    distance = (point - ctxt_c2w[:3, 3]).norm(dim=-1)
    in_view = hit & (depth > 0) & ((uv >= 0) & (uv <= 1)).all(-1)  # only these pixels need the ray back
    t_back = torch.full_like(t, math.inf)
    t_back[in_view] = cast_from_camera(vertices, faces, ctxt_c2w, ctxt_K, uv[in_view])[0]
    seen = in_view & (t_back >= distance - 1e-3)
    part = torch.where(hit, (~seen).long(), torch.full_like(face, -1))
    return (shade * hit).view(size, size), part.view(size, size)


def paint(shade, part, seen_colour, hidden_colour):
    """Images (3, S, S) in [-1, 1] from render_mesh's shade and part, with palette indices for the two parts."""
    palette = torch.tensor(PALETTE)
    albedo = torch.where((part == 1)[..., None], palette[hidden_colour], palette[seen_colour])  # (S, S, 3)
    return 2 * (albedo * shade[..., None] * (part >= 0)[..., None]).permute(2, 0, 1) - 1


# -----------------------------------------------------------------------------
# The data set


def camera(azimuth_deg, elevation_deg, size):
    """A camera CAM_DIST from the origin looking at it (world z up): c2w (4, 4), K (3, 3)."""
    world = world_lib.World(size=size, cam_dist=CAM_DIST, target=(0.0, 0.0, 0.0), half_fov_deg=HALF_FOV_DEG)
    params = world_lib.cameras(torch.tensor(math.radians(azimuth_deg)), torch.tensor(math.radians(elevation_deg)),
                               world)
    return params["c2w"], params["K"]


def random_rotation(generator):
    """A rotation drawn uniformly (QR of a Gaussian matrix, signs fixed): (3, 3)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return (q if torch.det(q) > 0 else -q).float()


def place(vertices, generator):
    """The mesh centred on its bounding box, scaled to a bounding-sphere radius in [0.7, 1], randomly turned."""
    centred = vertices - (vertices.amin(0) + vertices.amax(0)) / 2
    radius = 0.7 + 0.3 * torch.rand((), generator=generator)
    return centred / centred.norm(dim=-1).max() * radius @ random_rotation(generator).T


def draw_scene(vertices, n_views, generator):
    """A scene's random parts: the mesh placed (place), its seen and hidden palette colours, and its training
    views (azimuth, elevation) in degrees, frame 0 the context. Nothing is rendered, so that a resumed build can
    draw the scenes it already has, and go on drawing exactly what an uninterrupted build would."""
    placed = place(vertices, generator)
    colours = torch.randint(len(PALETTE), (2,), generator=generator).tolist()
    ctxt_az = 360 * torch.rand((), generator=generator).item()
    views = [(ctxt_az, 25.0)] + [(360 * torch.rand((), generator=generator).item(),
                                  10 + 40 * torch.rand((), generator=generator).item()) for _ in range(n_views - 1)]
    return {"vertices": placed, "colours": colours, "views": views}


def write_scene(folder, scene, faces, size):
    """One scene of draw_scene (module docstring) in NeRF-synthetic format, with its posterior.pt; returns the
    palette indices of its seen and hidden part. transforms_test.json holds the three far cameras and then the two
    near ones (NEAR_DEG either side of the context camera, where the seen part is scored)."""
    vertices, (seen_colour, hidden_colour), views = scene["vertices"], scene["colours"], scene["views"]
    ctxt_c2w, ctxt_K = camera(*views[0], size)
    far = [(views[0][0] + d, 25.0) for d in world_lib.FAR_SIDE_DEG]
    near = [(views[0][0] + d, 25.0) for d in (-NEAR_DEG, NEAR_DEG)]
    for split, angles in (("train", views), ("test", far + near)):
        c2w, K, images, alpha, renders, parts = [], [], [], [], [], []
        for az, el in angles:
            pose, k = camera(az, el, size)
            shade, part = render_mesh(vertices, faces, pose, k, size, ctxt_c2w, ctxt_K)
            c2w.append(pose), K.append(k), alpha.append((part >= 0).float()), parts.append(part)
            images.append(paint(shade, part, seen_colour, hidden_colour))
            renders.append(torch.stack([paint(shade, part, seen_colour, h) for h in range(len(PALETTE))]))
        writers.write_blender(os.path.join(folder, f"transforms_{split}.json"), torch.stack(c2w), torch.stack(K),
                                torch.stack(images), torch.stack(alpha), context_frame=0 if split == "train" else None)
    parts = torch.stack(parts)  # (5, S, S) of the test cameras: far, then near
    with toy_problems.written_whole(os.path.join(folder, "posterior.pt")) as tmp:
        torch.save({"hidden": world_lib.erode(parts[:len(far)] == 1),  # away from the silhouette and the seen part
                    "palette_renders": torch.stack(renders[:len(far)]), "near_seen": parts[len(far):] != 1,
                    "seen_colour": seen_colour, "hidden_colour": hidden_colour}, tmp)
    return seen_colour, hidden_colour


def build(out, n_scenes=48, n_views=10, size=32, seed=0, names=mesh_files.NAMES, meshes=None, progress=True,
          split="train"):
    """Write n_scenes scenes (mesh i % len(names) of the named meshes, sorted, each scene its own rotation, scale,
    colours and cameras) into out/scene_NNN, and MANIFEST beside them; meshes {name: (vertices, faces)} instead
    of names: those meshes, not fetched (the tests' own).

    split "train" draws the scenes from toy_problems.dataset_generator(seed), "test" from held_out_generator(seed)
    (module docstring). The set is built in out.partial, which holds formats.UNFINISHED (the loaders refuse it)
    until every scene is there, and is then renamed to out: out is whole or absent. An interrupted build resumes:
    the same options again keep the scenes already in out.partial (each appears whole: it is written as
    scene_NNN.tmp, then renamed) and render the rest, and since the seed draws every scene anew, the set is the
    one an uninterrupted build writes. Raises KeyboardInterrupt("interrupted: ...") on Ctrl-C, saying how to
    finish."""
    if split not in SPLITS:
        raise ValueError(f"--split must be train or test, got {split!r}")
    unknown = [n for n in names if n not in mesh_files.NAMES]
    if meshes is None and (unknown or not names):
        raise ValueError(f"--meshes must name some of {', '.join(mesh_files.NAMES)}, got {', '.join(names) or 'none'}")
    stream, make_generator = SPLITS[split]
    generator = make_generator(seed)  # a seed outside [0, 2^30) is refused here, before any folder is made
    out = os.path.normpath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(f"--out {out!r} already exists{'' if os.path.isdir(out) else ' as a file'}; choose a new "
                         "folder (nothing is overwritten)")
    partial = out + ".partial"
    marker = os.path.join(partial, formats.UNFINISHED)
    command = shlex.join(["python", "-m", "posed_images.meshes", "--out", out, "--scenes", str(n_scenes),
                          "--views", str(n_views), "--size", str(size), "--seed", str(seed)]
                         + (["--split", split] if split != "train" else [])  # the defaults left out
                         + (["--meshes", *names] if meshes is None and tuple(names) != mesh_files.NAMES else []))
    if os.path.isdir(partial) and os.listdir(partial):  # an interrupted build
        if not os.path.isfile(marker):
            raise ValueError(f"{partial!r} exists and is not an unfinished build of posed_images/meshes.py; move it "
                             "away or choose another --out")
        with open(marker) as f:
            started = f.read().strip()
        if started != command:
            raise ValueError(f"{partial} is an unfinished build of other options; finish it with: {started} "
                             "(or delete it to start another)")
    try:
        with toy_problems.written_whole(marker) as tmp, open(tmp, "w") as f:  # makes the folder
            f.write(command + "\n")
    except OSError as e:
        raise ValueError(f"--out {out!r}: cannot write the folder {partial!r} beside it ({e.strerror})") from None
    try:
        fetched = meshes is None
        meshes = meshes or mesh_files.fetch_meshes(names)  # after the folder proved writable, not before
    except BaseException:
        if os.listdir(partial) == [formats.UNFINISHED]:  # nothing built yet: leave nothing behind
            shutil.rmtree(partial)
        raise
    names = sorted(meshes)
    folders = [os.path.join(partial, f"scene_{i:03d}") for i in range(n_scenes)]
    done, writing = sum(os.path.isdir(f) for f in folders), None
    bar = tqdm(total=n_scenes, initial=done, desc="rendering scenes", disable=not progress)
    try:
        for i, folder in enumerate(folders):
            vertices, faces = meshes[names[i % len(names)]]
            scene = draw_scene(vertices, n_views, generator)  # for every scene, written or not: the same draws
            if os.path.isdir(folder):
                continue
            writing = folder + ".tmp"
            shutil.rmtree(writing, ignore_errors=True)  # what a killed build left half-written
            write_scene(writing, scene, faces, size)
            os.rename(writing, folder)
            done, writing = done + 1, None
            bar.update(1)
    except BaseException as e:  # Ctrl-C, a full disk, ...: no scene half-written
        if writing:
            shutil.rmtree(writing, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(f"interrupted: {done} of {n_scenes} scenes are in {partial}; finish the build "
                                    f"with: {command}") from None
        raise
    finally:
        bar.close()
    manifest = {"split": split, "stream": stream, "seed": seed, "scenes": n_scenes, "views": n_views, "size": size,
                "meshes": names, "command": command,
                "source": [w for w, files in mesh_files.SOURCES.items() if set(files) & set(names)] if fetched
                else "given to build()"}
    with toy_problems.written_whole(os.path.join(partial, MANIFEST)) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.remove(marker)
    if os.path.isdir(out):  # an empty folder (checked above), which a folder cannot be renamed over everywhere
        os.rmdir(out)
    os.rename(partial, out)


def read_manifest(path):
    """(root, manifest) of the built set that holds path (a file or folder in it, or its root): the nearest
    MANIFEST at or above path; None if there is none, or it is not one of build()'s."""
    folder = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
    while True:
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                manifest = json.load(f)
            if isinstance(manifest, dict) and any(manifest.get("split") == split and manifest.get("stream") == stream
                                                  for split, (stream, _) in SPLITS.items()):
                return folder, manifest
        except (OSError, ValueError):  # none here (or unreadable, or not JSON): look further up
            pass
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=SPLITS, default="train", help="train: a training set, its scenes drawn "
                        "from the data-set stream of --seed; test: a test set for mesh_scores.hidden_scores, from the "
                        "held-out stream, never the same scenes (default: train)")
    parser.add_argument("--out", help="a new folder for the data set, built in OUT.partial and renamed to OUT when "
                        "complete; after an interruption the same command resumes it (default: out/meshes, or "
                        "out/meshes-test with --split test; an existing file or non-empty folder is refused)")
    parser.add_argument("--scenes", type=int, default=48, help="scenes to render, >= 1 (default: 48)")
    parser.add_argument("--views", type=int, default=10, help="training views per scene, the context included, "
                        ">= 2 (default: 10)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels, >= 8 (default: 32, scenes3d's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rotations, scales, colours and cameras, "
                        f"in [0, 2^{toy_problems.SEED_BITS}) (default: 0)")
    parser.add_argument("--meshes", nargs="+", choices=mesh_files.NAMES, default=list(mesh_files.NAMES),
                        metavar="MESH", help="the meshes the scenes take in turn, of: " + ", ".join(mesh_files.NAMES)
                        + " (default: all; a test set of meshes a training set left out scores unseen shapes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: show one)")
    args = parser.parse_args()
    args.out = args.out or os.path.join("out", "meshes" if args.split == "train" else "meshes-test")
    try:
        for name, ok, allowed in (("scenes", args.scenes >= 1, ">= 1"), ("views", args.views >= 2, ">= 2"),
                                  ("size", args.size >= 8, ">= 8"),
                                  ("seed", 0 <= args.seed < 2 ** toy_problems.SEED_BITS,
                                   f"in [0, 2^{toy_problems.SEED_BITS})")):
            if not ok:
                raise ValueError(f"--{name} must be {allowed}, got {getattr(args, name)}")
        build(args.out, args.scenes, args.views, args.size, args.seed, names=tuple(dict.fromkeys(args.meshes)),
              progress=not args.no_progress, split=args.split)
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, RuntimeError, OSError) as e:  # OSError: a full disk, say (its message names the file)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.split == "train":
        print(f"{args.scenes} training scenes in {args.out}; train with: python train.py --problem scenes3d --data "
              f"{args.out} --format blender")
    else:
        print(f"{args.scenes} test scenes in {args.out}; score a model trained on a training set with: python "
              f"sample.py CKPT --meshes {args.out}")


if __name__ == "__main__":
    main()
