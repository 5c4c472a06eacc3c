"""Why does (or doesn't) the 3D model sample the hidden half's posterior? Five checks.

    python -m experiments.diagnose3d out/bench/scenes3d-dfm-seed0/ckpt.pt   # a few minutes on a 2-core CPU
    python -m experiments.diagnose3d notebooks/scenes3d-dfm.pt --n-contexts 8 --n-samples 16

In the world of scenes3d the context fixes everything but the back colour of each sphere, so
the Bayes-optimal denoiser of the far-side view is known in closed form: with R_k the true
scene rendered with back colour(s) k,
    p(k | x_t) ~ exp(-|x_t - sqrt(abar_t) R_k|^2 / 2 (1 - abar_t)),   x0*(x_t) = sum_k p(k | x_t) R_k.
1. sampler: dfm's DDIM sampler driven by x0* instead of the network (a DFM whose denoiser is x0*
   and whose forward model is the identity). Its back_tv must sit at the floor and nearly every
   sample must be sharp; if not, the sampler or the scores are wrong, not the model.
2. reading: the true far-side view noised to t, denoised once by the model, the field rendered
   from the far side: how often its back colour is the true one, next to how often x0*'s most
   likely colour is (the best possible at that t). Wrong at small t: the field cannot let the
   target view win on the back. Right only at small t: the model never learned to commit at the
   noise levels where the colour is decided.
3. diversity: the spread between samples of one context (mean pairwise RMS distance of their
   far-side renders on the back-half pixels), against the exact posterior's spread; and how
   often a sample's back copies its front colour (exact: 1 / palette size).
4. supervision: the share of training patches (target and novel view) that hold back-half
   pixels, from the problem's own sample_batch.
5. trajectory (one sphere): check 3 of the mesh set below, on the sphere's back half.

With --meshes DIR, a model (trained on the toy or on a data set) is checked on a test set of
posed_images/meshes.py instead, whose hidden part is exact too (posterior.pt: the far view with the
hidden part in every palette colour): checks 1 and 2 on its scenes' straight-opposite views, and
3. trajectory: along the model's own DDIM run, its x0 against x0* of the same x_t on the hidden
   pixels, and how much of the hidden part each paints in one colour (exact samples: all of it).

    python -m experiments.diagnose3d out/mesh-dfm/ckpt.pt --meshes out/meshes-test
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

import dfm
import toy_problems
import train
from experiments.diagnose import ExactDenoiser, exact_x0, posterior_weights
from posed_images import mesh_scores
from toy_problems import scenes3d_eval, scenes3d_world as world_lib

T_READ = (0, 50, 100, 200, 400, 600, 800)


def palette_renders(scenes, params, world):
    """The true scenes rendered with every assignment of back colours: (B, K^M, 3, H, W), and the
    assignments (K^M, M)."""
    K, M = len(world.palette), scenes["center"].shape[1]
    backs = torch.tensor(list(itertools.product(range(K), repeat=M)))  # (K^M, M)
    renders = torch.stack([world_lib.render_scenes(world_lib.with_back_colours(scenes, b), params, world)
                           for b in backs], 1)
    return renders, backs


def back_pixels(scenes, params, world):
    """Pixels where a true back half is seen, eroded by one pixel: (B, H, W) bool."""
    parts = world_lib.render_parts(scenes, params, world)
    return world_lib.erode((parts >= 2) & (parts % 2 == 0))


def spread(obs, mask):
    """Mean pairwise RMS distance between the n samples of each context on its mask: obs (B, n, 3, H, W)."""
    n = obs.shape[1]
    d = ((obs[:, :, None] - obs[:, None]) ** 2).mean(3)  # (B, n, n, H, W)
    m = mask[:, None, None].float()
    rms = ((d * m).sum((-2, -1)) / m.sum((-2, -1)).clamp(min=1)).sqrt()  # (B, n, n)
    return (rms.sum((1, 2)) / (n * (n - 1))).mean().item()


def check_sampler(batch, far, world, timesteps, n, steps, generator):
    """1. dfm's DDIM sampler (the model's T steps and cosine schedule) with the exact x0*: its back_tv, floor, sharp."""
    B = batch["ctxt_obs"].shape[0]
    renders, _ = palette_renders(batch["scenes"], far, world)  # (B, K, 3, H, W)
    renders = renders.repeat_interleave(n, 0)  # (B * n, K, 3, H, W): one row per sample, as sample_signals draws
    bayes = dfm.DFM(ExactDenoiser(lambda x_t, abar: exact_x0(x_t, renders, abar)), dfm.identity, timesteps)
    x = dfm.sample_signals(bayes, {**batch, "trgt_params": far}, n, generator, steps)  # (B, n, 3, H, W)
    scores = world_lib.back_colour_scores(x, batch["scenes"], far, world)
    floor = world_lib.hidden_floor(n, B * world.n_spheres, torch.Generator().manual_seed(0), len(world.palette))
    print(f"1. sampler: DDIM ({steps} steps) driven by the exact x0*: back_tv {scores['tv']:.3f} "
          f"(floor {floor:.3f}), sharp {scores['sharp']:.3f}  [expected: the floor and about 1]")
    return scores


def denoised_once(model, batch, far, truth, generator, header):
    """Check 2's loop: for each t of T_READ, (t, abar_t, x_t, x0): the true far view truth (B, 3, S, S) noised to t
    and denoised once by the model at the far cameras; prints the check's title and the table's header first."""
    eps = torch.randn(truth.shape, generator=generator)
    print("2. reading the target: noise the true far view to t, denoise once, render the field from the far side")
    print(header)
    for t in T_READ:
        abar = model.abar[t]
        x_t = abar.sqrt() * truth + (1 - abar).sqrt() * eps
        _, x0 = model.denoise(batch["ctxt_obs"], batch["ctxt_params"], x_t, far,
                              torch.full((len(truth),), t, dtype=torch.long))
        yield t, abar, x_t, x0


@torch.no_grad()
def check_reading(model, batch, far, world, generator):
    """2. One denoising step from the noisy true far view: back-colour accuracy against the Bayes accuracy."""
    truth = world_lib.render_scenes(batch["scenes"], far, world)  # (B, 3, H, W)
    renders, backs = palette_renders(batch["scenes"], far, world)
    true_k = (backs[None] == batch["scenes"]["back"][:, None]).all(-1).float().argmax(1)  # (B,) index of the truth
    for t, abar, x_t, x0 in denoised_once(model, batch, far, truth, generator,
                                          "   t     model accuracy  model back RMSE  front copies   Bayes accuracy"):
        s = world_lib.back_colour_scores(x0[:, None], batch["scenes"], far, world)
        v = s["valid"]  # (B, M)
        accuracy = (s["nearest"][:, 0] == batch["scenes"]["back"])[v].float().mean().item()
        front = (s["nearest"][:, 0] == batch["scenes"]["front"])[v].float().mean().item()
        rmse = s["rmse"][:, 0][v].mean().item()
        bayes = (posterior_weights(x_t, renders, abar.expand(len(x_t))).argmax(1) == true_k).float().mean().item()
        print(f"   {t:<5d} {accuracy:14.3f} {rmse:16.3f} {front:13.3f} {bayes:16.3f}")


@torch.no_grad()
def check_diversity(model, batch, far, world, n, steps, seed):
    """3. Spread between samples of one context, and front-colour copies, against the exact posterior's."""
    B = batch["ctxt_obs"].shape[0]
    setting = model.denoiser.setting
    signal = dfm.sample_signals(model, {**batch, "trgt_params": far}, n, torch.Generator().manual_seed(seed), steps)
    samples = scenes3d_eval.render_at(signal, 180.0).view(B, n, 3, world.size, world.size)
    exact = scenes3d_eval.exact_posterior(batch["ctxt_obs"], None, n, torch.Generator().manual_seed(seed), setting)
    far_n = scenes3d_eval.cameras_at(180.0, B * n, setting, "cpu")
    exact = world_lib.render_scenes({k: v.flatten(0, 1) for k, v in exact.items()}, far_n, world).view_as(samples)
    mask = back_pixels(batch["scenes"], far, world)
    s = world_lib.back_colour_scores(samples, batch["scenes"], far, world)
    front = (s["nearest"] == batch["scenes"]["front"][:, None])[s["valid"][:, None].expand_as(s["nearest"])]
    print(f"3. diversity ({B} contexts x {n} samples, DDIM {steps} steps): "
          f"spread of the back {spread(samples, mask):.3f} "
          f"(exact posterior {spread(exact, mask):.3f}); front copies {front.float().mean().item():.3f} "
          f"(exact {1 / len(world.palette):.3f}); back_tv {s['tv']:.3f}, sharp {s['sharp']:.3f}")


def check_supervision(problem, n=512, seed=0):
    """4. Training patches that hold back-half pixels, from the problem's sample_batch."""
    batch = problem.sample_batch(n, torch.Generator().manual_seed(seed))
    world = problem.SETTING.world
    line = []
    for view, pixels in (("trgt_params", "pixels"), ("novel_params", "novel_pixels")):
        parts = world_lib.render_parts(batch["scenes"], batch[view], world).flatten(1)  # (n, H*W)
        back = ((parts >= 2) & (parts % 2 == 0)).gather(1, batch[pixels]).sum(1)  # (n,) back pixels in the patch
        line.append(f"{view.split('_')[0]} patches with back pixels {(back > 0).float().mean().item():.2f}, "
                    f"with >= 10 {(back >= 10).float().mean().item():.2f}, back share of patch pixels "
                    f"{back.sum().item() / batch[pixels].numel():.3f}")
    print("4. supervision: " + "; ".join(line))


def mesh_truth(data, trained_on, size, n):
    """A mesh test set's first n scenes for checks 1 to 3: the batch (context, straight-opposite camera), renders
    (B, K, 3, S, S) of that view with the hidden part in each palette colour, keep (B, 1, S, S) its hidden pixels,
    and the true hidden colour (B,) and seen colour (B,)."""
    batch, _, posteriors = mesh_scores.held_out_scenes(data, trained_on, size, n)
    renders = torch.stack([p["palette_renders"][0] for p in posteriors])
    keep = torch.stack([p["hidden"][0] for p in posteriors])[:, None]
    hidden, seen = (torch.tensor([p[k] for p in posteriors]) for k in ("hidden_colour", "seen_colour"))
    return batch, renders, keep, hidden, seen


def check_sampler_meshes(batch, renders, keep, timesteps, n, steps, generator):
    """1. on a mesh set: dfm's DDIM sampler with the exact x0* of the hidden colour: its hidden_tv, floor, sharp."""
    exact = renders.repeat_interleave(n, 0)  # (B * n, K, 3, S, S): one row per sample, as sample_signals draws
    bayes = dfm.DFM(ExactDenoiser(lambda x_t, abar: exact_x0(x_t, exact, abar)), dfm.identity, timesteps)
    scores = world_lib.hidden_colour_scores(dfm.sample_signals(bayes, batch, n, generator, steps), keep, renders)
    floor = world_lib.hidden_floor(n, len(renders), torch.Generator().manual_seed(0), renders.shape[1])
    print(f"1. sampler: DDIM ({steps} steps) driven by the exact x0*: hidden_tv {scores['tv']:.3f} "
          f"(floor {floor:.3f}), sharp {scores['sharp']:.3f}  [expected: the floor and about 1]")
    return scores


@torch.no_grad()
def check_reading_meshes(model, batch, renders, keep, hidden, seen, generator):
    """2. on a mesh set: one denoising step from the noisy true far view: hidden-colour accuracy against Bayes'."""
    truth = renders[torch.arange(len(hidden)), hidden]  # (B, 3, S, S)
    # what the encoder's half-resolution features (Encoder: 2x2 pixels folded into one) can keep of the truth
    half = F.interpolate(F.avg_pool2d(truth, 2), scale_factor=2, mode="bilinear", align_corners=False)
    for t, abar, x_t, x0 in denoised_once(model, batch, batch["trgt_params"], truth, generator,
                                          "   t     model accuracy  model hidden RMSE  seen copies   Bayes accuracy"):
        s = world_lib.hidden_colour_scores(x0[:, None], keep, renders)
        nearest = s["nearest"][:, 0, 0]  # (B,)
        bayes = (posterior_weights(x_t, renders, abar.expand(len(x_t))).argmax(1) == hidden).float().mean().item()
        print(f"   {t:<5d} {(nearest == hidden).float().mean().item():14.3f} {s['rmse'].mean().item():18.3f} "
              f"{(nearest == seen).float().mean().item():12.3f} {bayes:16.3f}")
    print(f"the true far view at half resolution, upsampled (what half-resolution features could keep of it; posed "
          f"images' encoders are full resolution): hidden RMSE "
          f"{world_lib.hidden_colour_scores(half[:, None], keep, renders)['rmse'].mean().item():.3f} (the sharp "
          f"threshold: {world_lib.SHARP_RMSE})")


def one_colour_share(obs, keep, renders):
    """How much of each hidden part is painted in one colour: the share of its pixels whose nearest palette render
    (pixel by pixel) is the part's most common one, 1 for a committed sample. obs (B, 3, S, S), keep (B, 1, S, S),
    renders (B, K, 3, S, S) -> (B,)."""
    nearest = ((obs[:, None] - renders) ** 2).sum(2).argmin(1)  # (B, S, S)
    counts = (F.one_hot(nearest, renders.shape[1]).float() * keep[:, 0, ..., None]).sum((1, 2))  # (B, K)
    return counts.max(1).values / counts.sum(1).clamp(min=1)


@torch.no_grad()
def check_trajectory(model, batch, renders, keep, n, steps, seed, number=3):
    """Check `number` (3 on a mesh set, 5 on the toy's sphere): along the model's own DDIM trajectory, its x0 against
    the exact x0* of the same x_t on the hidden pixels (keep (B, 1, S, S); renders (B, K, 3, S, S), the view in
    each palette colour), how sure x0* is of one colour there, and how much of the hidden part each paints in one
    colour."""
    many = {k: dfm.repeat_batch(batch[k], n) for k in ("ctxt_obs", "ctxt_params", "trgt_params")}
    exact, hidden = renders.repeat_interleave(n, 0), keep.repeat_interleave(n, 0)  # one row per sample
    x = torch.randn(exact[:, 0].shape, generator=torch.Generator().manual_seed(seed))  # (B * n, 3, S, S) x_T
    abar = torch.cat([model.abar, model.abar.new_ones(1)])
    ts = torch.linspace(model.timesteps - 1, 0, steps).round().long().tolist()
    print(f"{number}. along the model's own DDIM trajectory ({steps} steps, {len(renders)} scenes x {n} samples), "
          f"on the hidden pixels: the model's x0 against the exact x0* of the same x_t (RMSE), how sure x0* is of one "
          f"colour (its largest posterior weight), and the share of the hidden part painted in one colour (exact: 1)")
    print("   step  t     x0 vs x0*   x0* sureness   one colour (model x0)")

    def rms(a, b):  # (B * n, 3, S, S) each -> (B * n,), the RMS difference on the hidden pixels
        return ((((a - b) ** 2).mean(1, keepdim=True) * hidden).sum((1, 2, 3)) / hidden.sum((1, 2, 3))).sqrt()

    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1])):
        _, x0 = model.denoise(many["ctxt_obs"], many["ctxt_params"], x, many["trgt_params"],
                              torch.full((len(x),), t, dtype=torch.long))
        x0_exact = exact_x0(x, exact, abar[t].expand(len(x)))
        if i % 5 == 0 or t_prev < 0:
            sure = posterior_weights(x, exact, abar[t].expand(len(x))).max(1).values
            print(f"   {i:<5d} {t:<5d} {rms(x0, x0_exact).mean().item():9.3f} {sure.mean().item():14.3f} "
                  f"{one_colour_share(x0, hidden, exact).mean().item():22.3f}")
        x = dfm.ddim_step(x, x0, abar[t], abar[t_prev], 0.0, None)
    scores = world_lib.hidden_colour_scores(x.view(len(renders), n, *x.shape[1:]), keep, renders)
    print(f"   the samples: hidden RMSE to the nearest one-colour render {scores['rmse'].mean().item():.3f} (sharp "
          f"below {world_lib.SHARP_RMSE}), sharp {scores['sharp']:.3f}, hidden_tv {scores['tv']:.3f}")


def main():
    parser = argparse.ArgumentParser(prog="python -m experiments.diagnose3d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a scenes3d DFM checkpoint (a run's ckpt.pt or an exported notebooks/*.pt)")
    parser.add_argument("--n-contexts", type=int, default=4, help="held-out contexts for checks 1-3 (default 4)")
    parser.add_argument("--n-samples", type=int, default=8, help="samples per context for checks 1 and 3 (default 8)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="held-out contexts and noise (default 0)")
    parser.add_argument("--meshes", metavar="DIR", help="check on this test set of posed_images/meshes.py (built "
                        "with --split test, never the model's training set) instead of the toy's scenes: checks 1 "
                        "to 3 of the mesh set, --n-contexts of its scenes (default: the toy's scenes, all five checks)")
    args = parser.parse_args()
    with toy_problems.one_line_exit():
        for name in ("n_contexts", "n_samples", "steps"):
            if getattr(args, name) < (2 if name == "n_samples" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be at least {2 if name == 'n_samples' else 1}, "
                                 f"got {getattr(args, name)}")
        ckpt, cfg = train.load_checkpoint(args.checkpoint)  # a one-line error for a missing or damaged file
        if not cfg.problem.startswith("scenes3d") or cfg.model != "dfm" or (cfg.data and args.meshes is None):
            raise ValueError(f"{args.checkpoint} holds a {cfg.problem} {cfg.model} model"
                             + (f" trained on --data {cfg.data}" if cfg.data else "") +
                             "; this diagnoses a scenes3d dfm model, on the toy's scenes (whose hidden half it knows "
                             "exactly) if it trained on them, else on a mesh test set (--meshes DIR)")
        model, cfg = train.load_ema_model(args.checkpoint)
        step = ckpt["step"]
        if args.meshes is None:
            run(model, cfg, step, args)
            return
        model.eval()
        batch, renders, keep, hidden, seen = mesh_truth(args.meshes, cfg.data, model.denoiser.setting.world.size,
                                                        args.n_contexts)
        print(f"{args.checkpoint}: {cfg.problem} {model.kind} after {step} steps; {len(hidden)} scenes of "
              f"{args.meshes}")
        check_sampler_meshes(batch, renders, keep, model.timesteps, args.n_samples, args.steps,
                             torch.Generator().manual_seed(args.seed))
        check_reading_meshes(model, batch, renders, keep, hidden, seen, torch.Generator().manual_seed(args.seed))
        check_trajectory(model, batch, renders, keep, args.n_samples, args.steps, args.seed)


def run(model, cfg, step, args):
    """The five checks, on the held-out contexts of args.seed."""
    model.eval()
    problem = toy_problems.load(cfg.problem)
    setting = model.denoiser.setting
    world = setting.world
    batch = problem.held_out_batch(args.n_contexts, seed=args.seed)
    far = scenes3d_eval.cameras_at(180.0, args.n_contexts, setting, "cpu")
    print(f"{args.checkpoint}: {cfg.problem} {model.kind} after {step} steps; {args.n_contexts} held-out contexts "
          f"(seed {args.seed})")
    generator = torch.Generator().manual_seed(args.seed)
    check_sampler(batch, far, world, model.timesteps, args.n_samples, args.steps, generator)
    check_reading(model, problem.held_out_batch(4 * args.n_contexts, seed=args.seed),
                  scenes3d_eval.cameras_at(180.0, 4 * args.n_contexts, setting, "cpu"), world,
                  torch.Generator().manual_seed(args.seed))
    check_diversity(model, batch, far, world, args.n_samples, args.steps, args.seed)
    check_supervision(problem, seed=args.seed)
    if world.n_spheres == 1:  # one hidden part, one colour (two spheres may rightly paint two)
        renders, _ = palette_renders(batch["scenes"], far, world)
        keep = back_pixels(batch["scenes"], far, world)[:, None]  # (B, 1, S, S)
        check_trajectory(model, {**batch, "trgt_params": far}, renders, keep, args.n_samples, args.steps, args.seed,
                         number=5)


if __name__ == "__main__":
    main()
