"""Draw samples from a trained checkpoint, score them against the exact posterior, save a figure.

    python sample.py out/flatland-dfm/ckpt.pt
    python sample.py out/gp1d-dfm/ckpt.pt --n-samples 128 --steps 100 --seed 1
    python sample.py out/flatland-dfm/ckpt.pt --sampler ddpm --temperature 0.85
    python sample.py out/flatland-dfm/ckpt.pt --views-in-turn 0   # the scene read off the target view alone
    python sample.py out/scenes3d-dfm/ckpt.pt --compare out/scenes3d-deterministic/ckpt.pt
    python sample.py out/scenes3d-dfm/ckpt.pt --image my.png --fov 60   # scenes from your own image: an orbit GIF

Scores are distances between the model's samples and exact posterior samples for held-out
contexts (lower is better); each "_floor" is the same distance between two independent
exact sample sets of the same size, the best any model can score. By default the settings
are the problem's evaluate() defaults, the ones experiments/bench.py and the README's tables use, so the
numbers are comparable with the tables.
"""
import argparse
import dataclasses
import inspect
import os

# Before torch loads, train.py's rule: idle OpenMP threads spin on an idle machine, sleep on a busy one
load_average = getattr(os, "getloadavg", lambda: (float("inf"),))()[0]
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if load_average < 0.5 else "PASSIVE")

import torch
from matplotlib.backend_bases import FigureCanvasBase
from tqdm import tqdm

import dfm
import toy_problems
import config
import train


def use_sampler(model, **options):
    """Make every model.sample call use these sampler options, with a progress bar per call.

    A problem's evaluate() and plot() take no sampler options, but every sample they draw goes
    through model.sample (also inside sample_autoregressive), so we wrap it on this instance.
    """
    sample = model.sample

    def sample_with_options(*args, **kwargs):
        kwargs = {**kwargs, **options}
        calls = 1 if model.kind == "deterministic" else kwargs.get("steps", 50) * (1 + (kwargs.get("guidance", 1) != 1))
        with tqdm(total=calls, desc=f"sampling {len(args[0])} signals", unit="call", leave=False) as bar:
            def tick(module, inputs, output):  # one denoiser call per step (two if guided); returns None,
                bar.update(1)                  # which keeps the denoiser's output
            hook = model.denoiser.register_forward_hook(tick)
            try:
                return sample(*args, **kwargs)
            finally:
                hook.remove()

    model.sample = sample_with_options


def evaluate_defaults(name):
    """'gp1d 64, flatland 16, ...': each problem's evaluate() default of one argument, for --help."""
    return ", ".join(f"{problem_name} {inspect.signature(problem.evaluate).parameters[name].default}"
                     for problem_name, problem in config.problems_for_help().items())


def check(args, cfg):
    """A one-line error for any option that cannot work, before any sampling."""
    rules = [("n_contexts", args.n_contexts is None or args.n_contexts >= 1, "an integer >= 1"),
             ("n_samples", args.n_samples is None or args.n_samples >= 2,
              "an integer >= 2 (the distances compare sets of samples for each context)"),
             ("steps", args.steps is None or 1 <= args.steps <= cfg.timesteps,
              f"in [1, {cfg.timesteps}] (the model's diffusion steps)"),
             ("seed", 0 <= args.seed < 2 ** toy_problems.SEED_BITS, f"in [0, 2^{toy_problems.SEED_BITS})"),
             ("eta", args.eta is None or args.eta >= 0, "a number >= 0"),
             ("temperature", args.temperature is None or args.temperature > 0, "a number > 0"),
             ("guidance", args.guidance in (None, 1) or cfg.ctxt_drop_prob > 0,
              "1 for this checkpoint: guidance needs a model trained with --ctxt-drop-prob > 0"),
             ("views_in_turn", args.views_in_turn is None or (
                 args.views_in_turn >= 0 and "views_in_turn" in inspect.signature(
                     toy_problems.load(cfg.problem).evaluate).parameters),
              "an integer >= 0, for a flatland checkpoint")]
    for name, ok, allowed in rules:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(args, name)}")
    if args.image is not None and (not cfg.problem.startswith("scenes3d") or args.fov is None or args.compare):
        raise ValueError("--image needs a checkpoint of a 3D problem (scenes3d*) and --fov, and takes no --compare")
    if args.fov is not None and args.image is None:
        raise ValueError("--fov is the field of view of --image; give both")
    if args.figure is None:
        return  # the default, out/samples/ or beside a run's ckpt.pt (figure_path)
    extension = os.path.splitext(args.figure)[1].lstrip(".").lower()  # none: figure_path adds .png
    formats = FigureCanvasBase.get_supported_filetypes()  # what matplotlib's savefig can write
    if extension and extension not in formats:
        raise ValueError(f"--figure {args.figure!r} must end in an image format matplotlib writes: "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    folder = os.path.dirname(args.figure) or "."
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise ValueError(f"--figure {args.figure!r}: the folder {folder!r} does not exist or is not writable")


def sample_image(model, cfg, context, args):
    """sample.py --image: scenes sampled from one image of the user's own, written as an orbit GIF beside the
    figure. A model trained on posed images (--data) has its context camera at the origin, where the image's
    camera is put, and the cameras swing around the point at the data's typical depth in front of it; the toy
    model was trained with its world's context camera, so the image's camera goes there, and the cameras
    circle the toy's world. The samples aim at the orbit's camera furthest from the context."""
    from posed_images import problem as posed
    from toy_problems import scenes3d_world as world_lib
    setting = model.denoiser.setting
    ctxt_obs, ctxt_params = context
    if cfg.data:
        orbit, aim = posed.arc_cameras(ctxt_params["K"][0, 0], setting.world.cam_dist), 6  # +30 degrees
    else:
        ctxt_params["c2w"] = world_lib.context_camera(setting.world)["c2w"][None, None]
        orbit = {**world_lib.orbit_cameras(24, setting.world), "K": ctxt_params["K"][0, 0].expand(24, 3, 3)}
        aim = 12  # straight opposite
    batch = {"ctxt_obs": ctxt_obs, "ctxt_params": ctxt_params,
             "trgt_params": {k: v[aim:aim + 1] for k, v in orbit.items()}}
    gif = os.path.splitext(args.figure)[0] + ".gif"
    posed.orbit_gif(model, dfm.map_batch(lambda v: v.to(args.device), batch), gif, orbit,
                             n_samples=args.n_samples or 3, steps=args.steps or 50, seed=args.seed)
    print(f"{cfg.problem} / {cfg.model}: {args.n_samples or 3} scenes sampled from {args.image}; orbit: {gif}")


def score_meshes(model, cfg, args):
    """sample.py --meshes: the hidden colour of a test set of posed_images/meshes.py against its exact posterior."""
    if not cfg.problem.startswith("scenes3d"):
        raise ValueError(f"--meshes is for checkpoints of the 3D problems (scenes3d*), not {cfg.problem}")
    from posed_images import mesh_scores, meshes
    scores = mesh_scores.hidden_scores(model, args.meshes, cfg.data, n_scenes=args.n_contexts or 8,
                                       n_samples=args.n_samples or 16, steps=args.steps or 50, seed=args.seed)
    print(f"{cfg.problem} / {cfg.model} on {args.meshes}:")
    for name, value in scores.items():
        print(f"  {name:>24s}  {value:.4f}")
    trained = meshes.read_manifest(cfg.data) if cfg.data else (None, {"meshes": []})  # the toy's scenes: no mesh
    shapes = meshes.read_manifest(args.meshes)[1]["meshes"]
    print(f"  {'meshes':>24s}  " + ", ".join(  # a training set without a record: not known, so not said
        m + (" (not in training)" if trained and m not in trained[1]["meshes"] else "") for m in shapes))


def with_data(cfg, data, needs_no_data):
    """cfg with its data set at `data` (sample.py --data) if given; a checkpoint trained on posed images whose data
    set is not where it says is refused in one line, unless what is asked needs no data set (--image, --meshes)."""
    if data is not None and not cfg.data:
        raise ValueError(f"--data is for checkpoints trained on posed images (train.py --data); this one was trained "
                         f"on the toy problem {cfg.problem}")
    data = data or cfg.data
    if data and not needs_no_data and not os.path.exists(data):
        raise FileNotFoundError(f"the data set of this checkpoint is not at {data!r}; if it moved, point to it "
                                "with --data PATH")
    return dataclasses.replace(cfg, data=data)


def figure_path(figure, checkpoint):
    """--figure (with .png added if it has no extension, as savefig would), or by default samples.png beside
    a run's ckpt.pt (the name train.py writes); the figure of any other checkpoint file (one exported into
    notebooks/, which git tracks, say) goes to out/samples/."""
    if figure is not None:
        return figure if os.path.splitext(figure)[1] else figure + ".png"
    if os.path.basename(checkpoint) == "ckpt.pt":
        return os.path.join(os.path.dirname(checkpoint), "samples.png")
    return os.path.join("out", "samples", os.path.splitext(os.path.basename(checkpoint))[0] + ".png")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", help="a ckpt.pt written by train.py")
    parser.add_argument("--seed", type=int, default=0,
                        help="picks the held-out contexts and the sampling noise, in [0, 2^30) (default: 0)")
    parser.add_argument("--n-contexts", type=int, help="held-out contexts to score on, >= 1; the figure shows "
                        "the first 3 of them, or all if fewer (default: the problem's, as in the README's tables: "
                        f"{evaluate_defaults('n_contexts')})")
    parser.add_argument("--n-samples", type=int, help="samples per context, >= 2 (default: the problem's: "
                        f"{evaluate_defaults('n_samples')})")
    parser.add_argument("--steps", type=int, help="sampler steps per sample, in [1, the model's --timesteps] "
                        f"(default: the problem's: {evaluate_defaults('steps')})")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], help="DDIM or ancestral DDPM (default: ddim)")
    parser.add_argument("--eta", type=float, help="DDIM noise: 0 = deterministic given the initial noise, "
                        "1 = as much as DDPM; ignored by ddpm (default: 0)")
    parser.add_argument("--temperature", type=float, help="scales the initial noise, > 0 (default: 1)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale on the x0 estimate, "
                        "1 = off; needs a model trained with --ctxt-drop-prob > 0 (default: 1)")
    parser.add_argument("--views-in-turn", type=int, help="flatland: views DFM samples one after another after the "
                        "target view, each added to the context, before the scene is read off; 0 = the target view "
                        "alone (default: 3)")
    parser.add_argument("--figure", help="where to save the figure, an image file such as x.png or x.pdf (.png "
                        "if it has no extension); problems with cameras also write an orbit GIF per context shown "
                        "beside it (x-N.gif) (default: samples.png beside a run's ckpt.pt, out/samples/NAME.png "
                        "for any other checkpoint file NAME.pt)")
    parser.add_argument("--compare", metavar="CKPT", help="a second checkpoint of the same problem (e.g. the "
                        "deterministic model) whose prediction the 3D problem's pictures show beside the samples "
                        "(default: none)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if this machine has a GPU, else cpu)")
    parser.add_argument("--image", help="3D checkpoints: sample scenes from this image of your own instead of "
                        "scoring held-out contexts, and write their orbit GIF (the --figure path with .gif) "
                        "(default: none)")
    parser.add_argument("--fov", type=float, help="the horizontal field of view of --image in degrees, in (0, 180); "
                        "it gives the intrinsics (square pixels, centred) (default: none; needed with --image)")
    parser.add_argument("--meshes", metavar="DIR", help="3D checkpoints: score the hidden colour on this test set of "
                        "posed_images/meshes.py (built with --split test) instead of the held-out draws; it refuses a "
                        "set the checkpoint trained on (default: none)")
    parser.add_argument("--data", help="checkpoints trained on posed images (train.py --data): where their data set "
                        "is now, if it moved (default: the path the checkpoint was trained with)")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with toy_problems.one_line_exit("interrupted: no figure or GIF was left half-written"):
        run(args)  # a bad option or file, or a bad frame found while indexing: one line


def run(args):
    """Everything that is checked comes first: the checkpoints, the options, the data set and the image."""
    _, cfg = train.load_checkpoint(args.checkpoint, args.device)  # its config: the options before the weights
    check(args, cfg)
    cfg = with_data(cfg, args.data, args.image is not None or args.meshes is not None)
    model, _ = train.load_ema_model(args.checkpoint, args.device)
    if args.image is not None:
        from posed_images import problem as posed
        context = posed.image_context(args.image, args.fov, model.denoiser.setting.world.size)
    compare = None
    if args.compare:
        if not cfg.problem.startswith("scenes3d"):
            raise ValueError(f"--compare is for the 3D problems (scenes3d...), whose pictures show a second "
                             f"model; this checkpoint is of {cfg.problem}")
        compare, compare_cfg = train.load_ema_model(args.compare, args.device)
        if compare_cfg.problem != cfg.problem:
            raise ValueError(f"--compare must be a checkpoint of the same problem ({cfg.problem}), "
                             f"got one of {compare_cfg.problem}")
    args.figure = figure_path(args.figure, args.checkpoint)
    options = {k: getattr(args, k) for k in ("steps", "sampler", "eta", "temperature", "guidance")
               if getattr(args, k) is not None}  # only what was given: the rest stays the problem's and the sampler's
    use_sampler(model, **options)  # steps too, so the figure uses them as well
    if args.meshes is not None:
        score_meshes(model, cfg, args)
        return
    problem = train.load_problem(cfg)
    if args.image is not None:
        sample_image(model, cfg, context, args)
        return
    defaults = inspect.signature(problem.evaluate).parameters
    n_contexts, n_samples, steps = (getattr(args, k) or defaults[k].default
                                    for k in ("n_contexts", "n_samples", "steps"))
    in_turn = {"views_in_turn": args.views_in_turn} if args.views_in_turn is not None else {}  # flatland's
    scores = problem.evaluate(model, seed=args.seed, n_contexts=n_contexts, n_samples=n_samples, steps=steps,
                              **in_turn)
    extras = "".join(f", {k} {options[k]}" for k in ("eta", "temperature", "guidance") if k in options)
    extras += f", {args.views_in_turn} views in turn" if in_turn else ""
    print(f"{cfg.problem} / {cfg.model}, {n_contexts} held-out contexts x {n_samples} samples, "
          f"{args.sampler or 'ddim'} with {steps} steps{extras}:")
    for name, value in scores.items():
        print(f"  {name:>24s}  {value:.4f}")
    shown = min(n_contexts, inspect.signature(problem.plot).parameters["n_contexts"].default)  # the first few
    extra = {"compare": compare} if compare is not None else in_turn  # the 3D problem draws the comparison beside
    problem.plot(model, args.figure, seed=args.seed, n_contexts=shown, **extra)
    for i in range(shown if hasattr(problem, "animate") else 0):  # a problem with cameras: an orbit per context
        gif = os.path.splitext(args.figure)[0] + f"-{i}.gif"
        problem.animate(model, gif, seed=args.seed, index=i, **extra)
        print(f"orbit of context {i}: {gif}")
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
