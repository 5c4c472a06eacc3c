"""Training the 3D model (toy_problems/scenes3d.py) on posed images from disk, read by posed_images/formats.py.

    python train.py --problem scenes3d --data PATH --format re10k|co3d|blender [--frame-window N]

What real data needs that the toy did not:
- Scale and bounds per format (FORMATS): rays are rendered between the format's near and far
  distances instead of inside the toy's scene box (the authors' 0.5/40 for CO3D with each
  sequence scaled to a mean depth of 10, 0.7/10 for RealEstate10K with poses as recorded; NeRF's
  2/6 for NeRF-synthetic); every example's poses are relative to its context camera, as in the paper.
- Images decoded, centre-cropped and resized once, cached as uint8 (one file per sequence, in
  DEFAULT_CACHE), by DataLoader workers with a progress bar; training batches are then made
  ahead by workers too (StepBatches), so a GPU does not wait on JPEG decoding.
- Examples from one sequence: a context frame, and a target and a novel frame at most
  --frame-window frames away from it (the authors draw CO3D's target 20 to 40 frames away). In a
  sequence that names its context frame (NeRF-synthetic's context_frame, as posed_images/meshes.py
  writes), most targets are far-side frames, chosen from the cameras alone, as in the toy (pick_frames).
The problem train.py builds from such a data set, and its scores, are in posed_images/problem.py.
"""
import glob
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import dfm
import toy_problems
from toy_problems import scenes3d
from posed_images import meshes
from posed_images.formats import (READERS, bad, check_files, check_finished, load_frames, read_co3d,
                                  read_co3d_annotations, read_cameras)

FAR_DEG = 90.0  # a frame is on the far side when its optical axis is more than this from the context camera's
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "dfm", "multiview")  # decoded, resized images
CACHE_VERSION = 2  # in every cache file's name: 2 reads 16-bit grey frames right (1 read them as almost white)


@dataclass(frozen=True)
class Format:
    """What the 3D model needs to know about a format's scenes, in the units after scaling."""
    near: float  # every ray is rendered from near to far, measured from its camera
    far: float
    depth: float  # a typical distance from the cameras to the scene: the field encodes depths relative to it
    mean_depth: float = 0.0  # > 0: each sequence is scaled to this mean depth of its cameras' look-at point


FORMATS = {
    "re10k": Format(near=0.7, far=10.0, depth=2.6),  # the authors' bounds; poses as recorded; depth sqrt(near * far)
    "co3d": Format(near=0.5, far=40.0, depth=10.0, mean_depth=10.0),  # the authors' bounds and scale
    "blender": Format(near=2.0, far=6.0, depth=4.0),  # NeRF's bounds for its synthetic scenes (cameras 4 away)
}


def look_at_point(c2w):
    """The point nearest to every camera's optical axis, in the least-squares sense: c2w (N, 4, 4) -> (3,)."""
    o, d = c2w[:, :3, 3], c2w[:, :3, 2]  # (N, 3) centres and forward axes
    off_axis = np.eye(3) - d[:, :, None] * d[:, None, :]  # (N, 3, 3) projections onto each axis' normal plane
    return np.linalg.lstsq(off_axis.sum(0), (off_axis @ o[..., None]).sum(0)[:, 0], rcond=None)[0]


def sequence_scale(seq, fmt):
    """The factor on a sequence's translations that gives it the format's scale (1 unless fmt.mean_depth).

    CO3D: the authors scale each sequence so that the median depth of the object (from CO3D's depth maps)
    becomes 10; we read no depth maps and use the depth of the point the cameras look at, the object's
    centre in an object-centric capture."""
    if not fmt.mean_depth:
        return 1.0
    c2w = seq["c2w"]
    depth = ((look_at_point(c2w) - c2w[:, :3, 3]) * c2w[:, :3, 2]).sum(-1).mean()
    if not depth > 0:
        raise bad(seq.get("annotations", seq["name"]), f"the cameras of sequence {seq['name']!r} do not look at a "
                                                       "common point in front of them; cannot scale it")
    return fmt.mean_depth / depth


def find_sequences(path, format, progress=True):
    """Every sequence of a data set (README, "Your own data"): read_* dicts with `scale` added.

    re10k: one <sequence>.txt or a folder of them; co3d: a sequence folder, a category folder (with
    frame_annotations.jgz), a root of categories, or a set list <category>/set_lists/*.json (its "train"
    frames); blender: one transforms_*.json or a folder searched for */transforms_train.json.
    Every camera is checked here (formats.py's readers); a data set still being built is refused."""
    if format not in READERS:
        raise ValueError(f"unknown format {format!r}: expected one of {', '.join(READERS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    check_finished([path])
    if format == "co3d":
        return find_co3d(path, progress)
    ext = {"re10k": ".txt", "blender": ".json"}[format]
    if os.path.isfile(path):
        files = [path]
    elif format == "re10k":
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
    else:
        files = sorted(glob.glob(os.path.join(path, "**", "transforms_train.json"), recursive=True))
    if not files:
        raise FileNotFoundError(f"{path}: no {'*' + ext if format == 're10k' else 'transforms_train.json'} "
                                f"found for format {format}")
    check_finished(files)  # a folder of data sets may hold one still being built
    return [with_scale(read_cameras(f, format), format) for f in tqdm(files, desc="indexing", disable=not progress)]


def find_co3d(path, progress):
    """CO3D sequences at path: a sequence folder, a category folder, a root of categories, or a set list."""
    path = os.path.normpath(path)
    jobs = []  # (category folder, sequence names or None for all, frame numbers per sequence or None)
    if path.endswith(".json"):  # a set list: {"train": [[sequence, frame_number, image path], ...], ...}
        try:
            with open(path) as f:
                train = json.load(f).get("train")
        except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
            train = None
        if not (isinstance(train, list) and train and all(isinstance(t, list) and len(t) == 3 for t in train)):
            raise bad(path, 'expected a CO3D set list: a JSON object with a non-empty "train" list of '
                            '[sequence, frame, path]')
        keep = {}
        for name, frame, _ in train:
            keep.setdefault(name, set()).add(frame)
        jobs = [(os.path.dirname(os.path.dirname(path)), sorted(keep), keep)]
    elif os.path.isfile(os.path.join(os.path.dirname(path), "frame_annotations.jgz")):  # one sequence folder
        jobs = [(os.path.dirname(path), [os.path.basename(path)], None)]
    elif os.path.isfile(os.path.join(path, "frame_annotations.jgz")):  # a category
        jobs = [(path, None, None)]
    else:  # a root of categories
        found = sorted(glob.glob(os.path.join(path, "*", "frame_annotations.jgz")))
        jobs = [(os.path.dirname(f), None, None) for f in found]
    if not jobs:
        raise FileNotFoundError(f"{path}: no frame_annotations.jgz in it, beside it or in its subfolders")
    sequences = []
    for category_dir, names, frames in tqdm(jobs, desc="indexing", disable=not progress):
        annotations = read_co3d_annotations(category_dir)
        for name in names or sorted(annotations):
            seq = read_co3d(os.path.join(category_dir, name), annotations, frames and frames[name])
            check_files(seq["files"], seq["annotations"])
            sequences.append(with_scale(seq, "co3d"))
    return sequences


def with_scale(seq, format):
    seq["scale"] = sequence_scale(seq, FORMATS[format])
    return seq


class SceneSet:
    """A data set of posed-image sequences: cameras in memory, images decoded, cropped and resized once
    into a cache (uint8, one file per sequence), and examples drawn from it like scenes3d's batches."""

    def __init__(self, path, format, size, frame_window=0, patch=12, cache_dir=None, workers=0, rank=0,
                 progress=True, far_targets=scenes3d.FAR_TARGETS):
        self.format, self.size, self.frame_window, self.patch = format, size, frame_window, patch
        self.far_targets = far_targets  # the share of targets drawn among far-side frames (pick_frames)
        self.cache_dir = cache_dir or DEFAULT_CACHE
        sequences = find_sequences(path, format, progress)
        self.sequences = [s for s in sequences if len(s["files"]) >= 2]
        if len(self.sequences) < len(sequences):
            print(f"multiview: left out {len(sequences) - len(self.sequences)} sequence(s) with fewer than 2 frames "
                  "(a context and a target)", file=sys.stderr)
        if not self.sequences:
            raise ValueError(f"{path}: no sequence with at least 2 frames")
        self.far = [far_frames(s) for s in self.sequences]  # (N,) bool each, or None without a context frame
        self.prepare(workers, rank, progress)
        self.opened = {}

    def cache_file(self, seq):
        """Named by everything the cached images depend on: the frames (and when they changed), the size."""
        stamp = [(f, os.path.getmtime(f)) for f in seq["files"]]
        key = hashlib.sha1(json.dumps([CACHE_VERSION, stamp, np.asarray(seq["K"]).tolist(), self.size]).encode())
        return os.path.join(self.cache_dir, f"{self.format}-{self.size}", key.hexdigest()[:20] + ".pt")

    def prepare(self, workers, rank, progress):
        """Decode every sequence not cached yet, in DataLoader workers: this is where each frame is read whole and
        checked (formats.load_frames), once, since a cached sequence was checked when it was cached. Each process
        starts at its own place in the list (rank), so that processes of one run share the work; a cache file is
        written whole or not at all."""
        self.files = [self.cache_file(s) for s in self.sequences]
        start = rank * len(self.files) // int(os.environ.get("WORLD_SIZE", 1))  # under torchrun, a share each
        order = list(range(start, len(self.files))) + list(range(start))
        todo = [i for i in order if not os.path.exists(self.files[i])]
        jobs = torch.utils.data.DataLoader(_CacheJobs(self, todo), batch_size=None, num_workers=workers)
        for error in tqdm(jobs, total=len(todo), desc=f"caching images at {self.size}x{self.size}",
                          disable=not progress or not todo):
            if error:
                raise ValueError(error)  # a bad frame: the one line that names it, not a worker's traceback

    def cache(self, i):
        """Sequence i's cached images (N, 3, S, S) uint8 and K (N, 3, 3), memory-mapped (opened once per process)."""
        if i not in self.opened:
            self.opened[i] = torch.load(self.files[i], mmap=True, weights_only=True)
        return self.opened[i]

    def __getstate__(self):  # DataLoader workers open their own memory maps
        return {**self.__dict__, "opened": {}}

    def pick_frames(self, n_frames, generator, context=None, far=None):
        """(context, target, novel) frame indices of a sequence of n_frames: the target and novel frames are
        other frames at most frame_window away from the context (any, with frame_window 0); the novel frame is
        the target again if the window holds only one other frame.

        far (n_frames,) bool, for a sequence with a context frame (far_frames): with probability far_targets the
        target is drawn among the far-side frames in the window (if it holds any), else among all of them, as the
        toy draws FAR_TARGETS of its targets on the far half of the ring (scenes3d.sample_batch): a random view
        shows little of what the context hides. The novel frame is any other. This leaves the optimum of the
        objective where it was: the choice depends on the cameras alone, never the images, and the cameras are
        independent of the hidden colour, so it changes how much each view weighs in the loss, not the
        distribution (the posterior given the context) that each view's loss is minimised by."""
        if context is None:
            context = int(torch.randint(n_frames, (), generator=generator))
        near = torch.arange(n_frames)
        near = near[(near != context) & ((near - context).abs() <= (self.frame_window or n_frames))]
        far_near = near[far[near]] if far is not None else near[:0]
        if len(far_near) and torch.rand((), generator=generator) < self.far_targets:
            target = far_near[torch.randint(len(far_near), (), generator=generator)]
            rest = near[near != target]
            order = torch.cat([target[None], rest[torch.randperm(len(rest), generator=generator)]])
        else:
            order = near[torch.randperm(len(near), generator=generator)]
        return context, int(order[0]), int(order[min(1, len(order) - 1)])

    def example(self, i, frames):
        """Views `frames` of sequence i, posed relative to the first one and scaled: obs (V, 3, S, S), c2w, K."""
        cached = self.cache(i)
        seq = self.sequences[i]
        c2w = torch.as_tensor(np.linalg.inv(seq["c2w"][frames[0]]) @ seq["c2w"][list(frames)], dtype=torch.float32)
        c2w[:, :3, 3] *= seq["scale"]
        return cached["images"][list(frames)].float() / 127.5 - 1, c2w, cached["K"][list(frames)]

    def sample_batch(self, batch_size, generator, device="cpu"):
        """Batches as scenes3d.sample_batch gives them (context, target and novel view of one sequence each,
        random patches of the target and novel view), plus sequence (B,) and frames (B, 3) to find them again."""
        which = torch.randint(len(self.sequences), (batch_size,), generator=generator)  # (B,)
        frames = torch.tensor([self.pick_frames(len(self.sequences[i]["files"]), generator,
                                                self.sequences[i].get("context"), self.far[i])
                               for i in which.tolist()])  # (B, 3)
        examples = [self.example(i, f.tolist()) for i, f in zip(which.tolist(), frames)]
        obs, c2w, K = (torch.stack(x) for x in zip(*examples))  # (B, 3, 3, S, S), (B, 3, 4, 4), (B, 3, 3, 3)
        params = lambda v: {"c2w": c2w[:, v], "K": K[:, v]}  # noqa: E731
        batch = dict(ctxt_obs=obs[:, :1], ctxt_params={"c2w": c2w[:, :1], "K": K[:, :1]},
                     trgt_obs=obs[:, 1], trgt_params=params(1), novel_obs=obs[:, 2], novel_params=params(2),
                     pixels=scenes3d.random_patches(batch_size, self.size, self.patch, generator),
                     novel_pixels=scenes3d.random_patches(batch_size, self.size, self.patch, generator),
                     sequence=which, frames=frames)
        return dfm.map_batch(lambda v: v.to(device), batch)


def far_frames(seq):
    """Which frames (N,) bool of a sequence that names its context frame see the scene from the far side: their
    optical axis more than FAR_DEG from the context camera's. Cameras only, never images; None without a
    context frame (a random context has no far side)."""
    if seq.get("context") is None:
        return None
    axes = torch.as_tensor(seq["c2w"][:, :3, 2], dtype=torch.float64)  # (N, 3) the forward axes (OpenCV: +z)
    return axes @ axes[seq["context"]] < math.cos(math.radians(FAR_DEG))


def check_not_held_out(sequences):
    """Refuse to train on a test set of posed_images/meshes.py (built with --split test): its scenes are the
    held-out ones that mesh_scores.hidden_scores measures."""
    for seq in sequences:
        found = meshes.read_manifest(seq["files"][0])
        if found and found[1]["split"] == "test":
            raise ValueError(f"{found[0]}: a test set (its {meshes.MANIFEST} says split test), held out for "
                             "scoring; train on a training set, built with: python -m posed_images.meshes --out DIR")


class _CacheJobs(torch.utils.data.Dataset):
    """Item k caches sequence todo[k]; returns the error message of a bad frame, or "" (DataLoader workers)."""

    def __init__(self, data, todo):
        self.data, self.todo = data, todo

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, k):
        i = self.todo[k]
        if os.path.exists(self.data.files[i]):  # another process of the run got here first
            return ""
        try:
            images, K = load_frames(self.data.sequences[i], size=self.data.size)
        except (ValueError, OSError) as e:
            return str(e)
        try:
            with toy_problems.written_whole(self.data.files[i]) as tmp:
                torch.save({"images": ((images + 1) * 127.5).round().to(torch.uint8), "K": K}, tmp)
        except OSError as e:
            return (f"{self.data.files[i]}: cannot write the image cache ({e.strerror or e}); it needs a writable "
                    f"{self.data.cache_dir} with room for the decoded images")
        return ""


class StepBatches(torch.utils.data.Dataset):
    """Item k is the batch of training step k, drawn from toy_problems.train_generator(seed, k, rank): the
    same batches as calling sample_batch in the loop, so --resume stays exact, made ahead by workers."""

    def __init__(self, data, batch_size, seed, rank):
        self.data, self.batch_size, self.seed, self.rank = data, batch_size, seed, rank

    def __len__(self):
        return 2 ** toy_problems.STEP_BITS

    def __getitem__(self, step):
        return self.data.sample_batch(self.batch_size, toy_problems.train_generator(self.seed, step, self.rank))
