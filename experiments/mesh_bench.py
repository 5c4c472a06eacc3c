"""The mesh benchmark: 3D models trained through the posed-image path on a training set of posed_images/meshes.py
(train.py --data), scored on held-out test sets against the exact posterior of their hidden part.

    python -m experiments.mesh_bench out/mesh1000-dfm/ckpt.pt out/mesh1000-deterministic/ckpt.pt \\
        --test out/meshes-test7 out/meshes-torus --results assets/results --figures assets

Every checkpoint is scored on every test set by mesh_scores.hidden_scores, which refuses a set that is not a test
set or that the model trained on, so no score here is of a scene the model saw. A test set of meshes that the
training set left out (built with --meshes) measures a shape the model never saw. The rows go to
<results>/meshes.json (or --name's file), whose table RESULTS.md shows (experiments/tables.py, bench.py
--readme). The first DFM checkpoint also draws, on the first test set, several samples per held-out scene seen
from straight opposite the context (meshes-samples.png, beside the deterministic model's render if one is given)
and a camera going around one scene's samples (meshes-orbit.gif).
"""
import argparse
import os
import re
import shlex
import sys

import torch

import dfm
import toy_problems
import train
from experiments import tables
from posed_images import mesh_scores, meshes
from toy_problems import scenes3d, scenes3d_eval

COLUMNS = ["hidden_tv", "hidden_tv_floor", "sharp", "consistent", "psnr_context", "ssim_context", "lpips_context",
           "psnr_near", "train ms/step"]


def score(checkpoint, test, n_scenes, n_samples, steps, seed):
    """One row of the table: what the checkpoint is (model, training set, steps) and its scores on test."""
    ckpt, cfg = train.load_checkpoint(checkpoint)
    model, cfg = train.load_ema_model(checkpoint)
    model.eval()
    trained, tested = meshes.read_manifest(cfg.data)[1], meshes.read_manifest(test)[1]
    scores = mesh_scores.hidden_scores(model, test, cfg.data, n_scenes, n_samples, steps, seed)
    scores["train ms/step"] = 1000 * ckpt["train_seconds"] / ckpt["step"]
    return {"checkpoint": checkpoint, "model": cfg.model, "seed": cfg.seed, "steps": ckpt["step"],
            "batch_size": cfg.batch_size, "trained_on": f"{trained['scenes']} scenes of {len(trained['meshes'])} meshes",
            "test": os.path.basename(os.path.normpath(test)), "test_meshes": tested["meshes"],
            "unseen": [m for m in tested["meshes"] if m not in trained["meshes"]], "scores": scores}


def orbit(size, n_frames=24):
    """Cameras all around the object at the context camera's elevation, relative to the context camera (as a
    test set's cameras are): c2w (F, 4, 4), K (F, 3, 3)."""
    ctxt_c2w, K = meshes.camera(0.0, 25.0, size)
    c2w = torch.stack([torch.linalg.inv(ctxt_c2w) @ meshes.camera(360.0 * f / n_frames, 25.0, size)[0]
                       for f in range(n_frames)])
    return {"c2w": c2w, "K": K.expand(n_frames, 3, 3)}


@torch.no_grad()
def draw(model, compare, test, trained_on, figures, n_scenes=4, n_samples=5, steps=50, seed=0):
    """meshes-samples.png: per held-out scene of test, the context, the truth and the model's samples (and the
    comparison model's render) from straight opposite; meshes-orbit.gif: the first scene's samples all around.
    trained_on: the models' training set (check_held_out refuses a test set inside it)."""
    size = model.denoiser.setting.world.size
    batch, _, posteriors = mesh_scores.held_out_scenes(test, trained_on, size, n_scenes)
    B = len(posteriors)
    truth = torch.stack([p["palette_renders"][0][p["hidden_colour"]] for p in posteriors])  # (B, 3, S, S)
    columns = [("context", batch["ctxt_obs"][:, 0]), ("truth", truth)]
    signals = {}
    for m, n in [(model, n_samples)] + ([(compare, 1)] if compare is not None else []):
        signals[m.kind] = dfm.sample_signals(m, batch, n, torch.Generator().manual_seed(seed), steps)
        views = scenes3d.forward(signals[m.kind], dfm.repeat_batch(batch["trgt_params"], n)).view(B, n, 3, size, size)
        columns += [(f"{m.kind} {i + 1}" if n > 1 else m.kind, views[:, i]) for i in range(n)]
    scenes3d_eval.save_grid(columns, "held-out meshes from straight opposite the context: the hidden part's colour "
                            "is sampled", os.path.join(figures, "meshes-samples.png"))
    cameras = orbit(size)
    panels = [(f"{model.kind} {i + 1}", scenes3d_eval.orbit_frames(signals[model.kind], i, cameras))
              for i in range(min(3, n_samples))]  # scene 0's samples are the first n_samples fields
    if compare is not None:
        panels.append((compare.kind, scenes3d_eval.orbit_frames(signals[compare.kind], 0, cameras)))
    scenes3d_eval.save_gif(panels, os.path.join(figures, "meshes-orbit.gif"), still=("context", batch["ctxt_obs"][0, 0]))


def main():
    parser = argparse.ArgumentParser(prog="python -m experiments.mesh_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="scenes3d checkpoints trained with --data on a training set "
                        "of posed_images/meshes.py (dfm or deterministic)")
    parser.add_argument("--test", nargs="+", required=True, help="test sets of posed_images/meshes.py (built with "
                        "--split test) to score every checkpoint on")
    parser.add_argument("--n-scenes", type=int, default=16, help="held-out scenes per test set (default 16)")
    parser.add_argument("--n-samples", type=int, default=8, help="samples per scene (default 8)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    parser.add_argument("--results", default=os.path.join("out", "bench", "results"), help="folder for the results "
                        "file (default: out/bench/results)")
    parser.add_argument("--name", default="meshes", help="the results file's name, <results>/NAME.json, whose "
                        "table RESULTS.md's block 'results NAME' shows (default: meshes)")
    parser.add_argument("--figures", help="folder for the figure and the GIF (default: none drawn)")
    args = parser.parse_args()
    with toy_problems.one_line_exit():
        for name in ("n_scenes", "n_samples", "steps"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if not re.fullmatch(r"[\w-]+", args.name):
            raise ValueError(f"--name must be letters, digits, _ or - (a results block's name), got {args.name!r}")
        trained_on = {}
        for path in args.checkpoints:  # every checkpoint and test set checked before any work
            _, cfg = train.load_checkpoint(path)  # a one-line error for a missing or damaged file
            if not cfg.problem.startswith("scenes3d") or not cfg.data or meshes.read_manifest(cfg.data) is None:
                raise ValueError(f"{path} holds a {cfg.problem} {cfg.model} model"
                                 + (f" trained on --data {cfg.data}" if cfg.data else " trained on the toy's scenes")
                                 + "; the mesh benchmark scores scenes3d models trained on a set of posed_images/"
                                 "meshes.py")
            for test in args.test:
                if not os.path.isdir(test):
                    raise ValueError(f"--test {test}: no such folder (build one with: python -m posed_images.meshes "
                                     f"--out {test} --split test)")
                mesh_scores.check_held_out(test, cfg.data, scenes3d.SETTINGS[cfg.problem].world.size)
            trained_on.setdefault(cfg.model, cfg.data)  # the first of each kind draws the figures
        rows = [score(path, test, args.n_scenes, args.n_samples, args.steps, args.seed)
                for path in args.checkpoints for test in args.test]
        os.makedirs(args.results, exist_ok=True)
        results = os.path.join(args.results, f"{args.name}.json")
        tables.write_json({"problem": "meshes", "command": shlex.join(["python", "-m", "experiments.mesh_bench",
                                                                       *sys.argv[1:]]),
                           "machine": tables.machine(), "n_samples": args.n_samples, "columns": COLUMNS,
                           "rows": rows},
                          results)
        print(tables.any_table(tables.load_results(results)))
        if args.figures:
            models = {}
            for path in args.checkpoints:
                m, _ = train.load_ema_model(path)
                models.setdefault(m.kind, m.eval())
            if "dfm" in models:
                os.makedirs(args.figures, exist_ok=True)
                draw(models["dfm"], models.get("deterministic"), args.test[0], trained_on["dfm"], args.figures,
                     seed=args.seed)


if __name__ == "__main__":
    main()
