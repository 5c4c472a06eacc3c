"""Where DFM loses the posterior's spread: its denoiser and its sampler, held against an exact denoiser.

    python -m experiments.diagnose out/gp1d-dfm/ckpt.pt --oracle out/gp1d-oracle/ckpt.pt
    python -m experiments.diagnose out/flatland-dfm/ckpt.pt --n-contexts 8 --exact 256

Given the context, the target observation O has the posterior p(O | context). With M exact posterior
samples S_1..S_M of the signal, O_i = forward(S_i, trgt_params) are samples of it, and the Bayes-optimal
x0 estimate at x_t = sqrt(abar_t) O + sqrt(1 - abar_t) eps is

    E[O | x_t] = sum_i softmax_i(-|x_t - sqrt(abar_t) O_i|^2 / (2 (1 - abar_t))) O_i,

exact as M grows (exact_x0); gp1d has it in closed form (gp1d.exact_denoiser). DFM's own sampler runs
on it (ExactDenoiser), and three checks split a gap to the exact posterior into the sampler's part and the
denoiser's:
1. the sampler with the exact denoiser, at several DDIM step counts and DDPM: does it reach the floor? And the
   model's own samples, DDIM 50 from the same contexts: the exact denoiser's distance minus the floor is the
   sampler's part of the model's gap, the model's distance minus the exact denoiser's the denoiser's part;
2. the model's x0 estimate against the exact one, at fixed t, on held-out contexts: the error, and whether
   it is shrunk towards the posterior mean (slope < 1) or just noisy (the residual);
3. the spread of the x0 estimates of one context's samples along a DDIM run, the model's against the exact
   denoiser's from the same initial noise: at which step the spread is lost.
The oracle (--oracle), which diffuses the signal itself, is held against its own exact denoiser in signal
space and seen through the same forward model, so its numbers compare with DFM's.

DFM's network outputs a signal, and its x0 is that signal's render at the target: where the exact x0 (a mean of
renders) is no render of any signal, no DFM network can give it. The best one can (in_range: the render nearest
the exact x0, which minimises DFM's loss at x_t) is run beside the exact denoiser in checks 1 to 3, so a gap that
it shares is the method's own at this forward model, and only the rest is its training's.
"""
import argparse
import sys

import torch
import torch.nn as nn

import dfm
import toy_problems
import train
from experiments import tables

T_READ = (0, 50, 100, 200, 400, 600, 800, 950)
FLOOR_SETS = 4  # independent exact sets, for the floor and its noise
SAMPLERS = (("ddim", 20), ("ddim", 50), ("ddim", 100), ("ddim", 250), ("ddpm", 250))
IN_RANGE_SAMPLER = ("ddim", 50)  # the sampler of the scores, driven by the best denoiser a DFM network can be
PROJECTION_STEPS, PROJECTION_LR = 100, 0.02  # Adam's search for the render nearest the exact x0 (in_range)


def posterior_weights(x_t, renders, abar):
    """p(O = O_i | x_t) for O uniform over renders: x_t (B, *obs_shape), renders (B, M, *obs_shape), abar (B,)
    -> (B, M), proportional to exp(-|x_t - sqrt(abar) O_i|^2 / (2 (1 - abar)))."""
    a = abar.view(-1, *[1] * (renders.dim() - 1))  # (B, 1, ...)
    sq = ((x_t[:, None] - a.sqrt() * renders) ** 2).flatten(2).sum(-1)  # (B, M)
    return torch.softmax(-sq / (2 * (1 - a.flatten(1))), dim=1)


def exact_x0(x_t, renders, abar):
    """E[O | x_t] for O uniform over renders: sum_i p(O_i | x_t) O_i -> (B, *obs_shape)."""
    weights = posterior_weights(x_t, renders, abar)  # (B, M)
    return (weights.view(*weights.shape, *[1] * (renders.dim() - 2)) * renders).sum(1)


def exact_denoiser(problem, batch, renders, signals, space):
    """x0(x_t, abar) of the target observation (space "obs") or of the signal ("signal"): the problem's closed
    form where it has one (gp1d), else exact_x0 over the M exact samples (exact as M grows; at small t, where
    one sample outweighs the rest, it snaps to the nearest sample instead)."""
    if hasattr(problem, "exact_denoiser"):
        trgt_params = batch["trgt_params"] if space == "obs" else None
        return problem.exact_denoiser(batch["ctxt_obs"], batch["ctxt_params"], trgt_params)
    options = renders if space == "obs" else signals
    return lambda x_t, abar: exact_x0(x_t, options, abar)


def in_range(problem, trgt_params, renders, signals):
    """x0 -> the best x0 a DFM denoiser can give: its network outputs a signal s and its x0 is forward(s), so the
    minimiser of its loss at x_t, sum_i p(O_i | x_t) |forward(s) - O_i|^2 = |forward(s) - E[O | x_t]|^2 + const,
    is the render nearest the exact x0. Found by Adam over s from the exact sample whose render is nearest (the
    best iterate is kept); where the forward model reaches every observation (gp1d's window) it is the exact x0.
    trgt_params, renders (B, M, *obs_shape) and signals (B, M, *signal_shape) are those of the x0's contexts."""
    def project(x0):  # (B, *obs_shape) -> (B, *obs_shape)
        B = x0.shape[0]
        nearest = ((renders - x0[:, None]) ** 2).flatten(2).sum(-1).argmin(1)  # (B,)
        s = signals[torch.arange(B), nearest].clone().requires_grad_()  # (B, *signal_shape)
        best, best_err = s.detach().clone(), torch.full((B,), float("inf"))
        optimizer = torch.optim.Adam([s], lr=PROJECTION_LR)
        with torch.enable_grad():
            for _ in range(PROJECTION_STEPS + 1):
                err = (problem.forward(s, trgt_params) - x0).pow(2).flatten(1).sum(1)  # (B,)
                better = err.detach() < best_err
                best[better], best_err = s.detach()[better], torch.where(better, err.detach(), best_err)
                optimizer.zero_grad()
                err.sum().backward()
                optimizer.step()
        return problem.forward(best, trgt_params)
    return project


def best_dfm(problem, batch, renders, signals, timesteps):
    """DFM driven by the best denoiser a DFM network can be: in_range of the exact x0 at the target."""
    exact = exact_denoiser(problem, batch, renders, signals, "obs")
    project = in_range(problem, batch["trgt_params"], renders, signals)
    return dfm.DFM(ExactDenoiser(lambda x_t, abar: project(exact(x_t, abar))), dfm.identity, timesteps)


class ExactDenoiser(nn.Module):
    """A denoiser that returns the Bayes-optimal x0 (x0(x_t, abar)): inside dfm.DFM with the identity as
    forward model, DFM's own samplers run on it."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def use_schedule(self, abar):
        self.abar = abar

    def forward(self, ctxt_obs, ctxt_params, x_t, trgt_params, t):
        return self.x0(x_t, self.abar[t])


def target_renders(problem, batch, signals):
    """The exact signals (B, M, *signal_shape) seen at each context's target: (B, M, *obs_shape)."""
    B, M = signals.shape[:2]
    params = dfm.repeat_batch(batch["trgt_params"], M)
    return problem.forward(signals.flatten(0, 1), params).view(B, M, *batch["trgt_obs"].shape[1:])


def repeated(batch, renders, signals, n):
    """Each context of a batch, its renders and its signals n times in a row, for n samples per context."""
    return ({k: dfm.repeat_batch(v, n) for k, v in batch.items()}, renders.repeat_interleave(n, 0),
            signals.repeat_interleave(n, 0))


# -----------------------------------------------------------------------------
# The three checks


@torch.no_grad()
def check_sampler(problem, batch, renders, signals, exact_a, n, seed, timesteps):
    """1. The sampler with the exact denoiser: energy distance of its samples to an independent exact set."""
    B = renders.shape[0]
    floors = torch.tensor([dfm.energy_distance(exact_a[:, :n], exact_a[:, j * n:(j + 1) * n]).mean().item()
                           for j in range(1, exact_a.shape[1] // n)])  # independent exact sets against the first
    floor = floors.mean().item()
    print(f"1. the sampler driven by the exact denoiser ({B} contexts x {n} samples); floor (exact vs exact) "
          f"{floor:.4f} ± {floors.std().item():.4f} over {len(floors)} exact sets")
    many, many_renders, many_signals = repeated(batch, renders, signals, n)
    model = dfm.DFM(ExactDenoiser(exact_denoiser(problem, many, many_renders, many_signals, "obs")), dfm.identity,
                    timesteps)
    rows = {}
    for sampler, steps in SAMPLERS:
        _, obs = model.sample(many["ctxt_obs"], many["ctxt_params"], many["trgt_params"], steps=steps,
                              sampler=sampler, generator=seed, obs_shape=renders.shape[2:])
        rows[f"{sampler} {steps}"] = d = dfm.energy_distance(obs.reshape(B, n, -1), exact_a[:, :n]).mean().item()
        print(f"   {sampler} {steps:4d} steps: {d:.4f}")
    sampler, steps = IN_RANGE_SAMPLER
    _, obs = best_dfm(problem, many, many_renders, many_signals, timesteps).sample(
        many["ctxt_obs"], many["ctxt_params"], many["trgt_params"], steps=steps, sampler=sampler, generator=seed,
        obs_shape=renders.shape[2:])
    rows[f"{sampler} {steps}, best DFM denoiser"] = d = dfm.energy_distance(obs.reshape(B, n, -1),
                                                                            exact_a[:, :n]).mean().item()
    print(f"   {sampler} {steps:4d} steps, driven by the best denoiser a DFM network can be (in_range): {d:.4f}")
    return floor, floors.std().item(), rows


@torch.no_grad()
def check_own(model, problem, batch, renders, exact_a, n, seed):
    """1, the model's row: its own samples (the sampler of the scores, DDIM 50) against the same exact set, from the
    same initial noise as the exact denoiser's run where the model diffuses the same space (DFM)."""
    B = renders.shape[0]
    sampler, steps = IN_RANGE_SAMPLER
    signals = dfm.sample_signals(model, batch, n, seed, steps, sampler=sampler)  # (B, n, *signal_shape)
    seen = target_renders(problem, batch, signals)  # (B, n, *obs_shape)
    d = dfm.energy_distance(seen.reshape(B, n, -1), exact_a[:, :n]).mean().item()
    print(f"   {sampler} {steps:4d} steps, driven by the {model.kind} model's own denoiser: {d:.4f}")
    return {f"{sampler} {steps}, the {model.kind} model's own denoiser": d}


@torch.no_grad()
def check_x0(model, problem, batch, renders, signals, seed):
    """2. The model's x0 estimate against the exact one at fixed t: RMSE, slope and residual about the mean."""
    generator = torch.Generator().manual_seed(seed)
    oracle = model.kind == "oracle"
    truth = batch["signal"] if oracle else batch["trgt_obs"]
    exact_fn = exact_denoiser(problem, batch, renders, signals, "signal" if oracle else "obs")
    eps = torch.randn(truth.shape, generator=generator)
    see = (lambda s: problem.forward(s, batch["trgt_params"])) if oracle else (lambda o: o)  # into obs space
    mean = renders.mean(1)  # E[O | context], the limit of the exact x0 as t -> T
    print(f"2. x0 estimates of the {model.kind} model against the exact ones, seen at the target "
          f"({truth.shape[0]} contexts); slope < 1: shrunk towards the posterior mean")
    project = None if oracle else in_range(problem, batch["trgt_params"], renders, signals)
    print("   t     rmse    exact spread  slope   residual" + ("" if oracle else "   best DFM rmse, slope"))
    rows = {}
    for t in T_READ:
        abar = model.abar[t].expand(truth.shape[0])  # (B,)
        a = abar.view(-1, *[1] * (truth.dim() - 1))  # (B, 1, ...)
        x_t = a.sqrt() * truth + (1 - a).sqrt() * eps  # x_t ~ q(x_t | truth), the same eps at every t
        _, x0 = model.denoise(batch["ctxt_obs"], batch["ctxt_params"], x_t, batch["trgt_params"],
                              torch.full((truth.shape[0],), t, dtype=torch.long))
        exact_x0_t = exact_fn(x_t, abar)
        est, exact = (see(v).flatten(1) - mean.flatten(1) for v in (x0, exact_x0_t))
        rows[t] = dict(rmse=(est - exact).pow(2).mean().sqrt().item(), exact_spread=exact.pow(2).mean().sqrt().item(),
                       **fit(est, exact))
        r = rows[t]
        line = f"   {t:<5d} {r['rmse']:.4f}  {r['exact_spread']:.4f}        {r['slope']:.3f}   {r['residual']:.4f}"
        if project is not None:  # how close the best DFM network could come
            best = project(exact_x0_t).flatten(1) - mean.flatten(1)
            r["best_rmse"], r["best_slope"] = (best - exact).pow(2).mean().sqrt().item(), fit(best, exact)["slope"]
            line += f"   {r['best_rmse']:.4f}, {r['best_slope']:.3f}"
        print(line)
    return rows


def fit(est, exact):
    """est = slope * exact + residual, by least squares: the slope and the residual's RMSE."""
    slope = ((est * exact).sum() / (exact * exact).sum().clamp(min=1e-12)).item()
    return dict(slope=slope, residual=(est - slope * exact).pow(2).mean().sqrt().item())


def spread(x):
    """Mean distance between two samples of one context: x (B, n, ...) -> a number."""
    x = x.flatten(2)
    n = x.shape[1]
    return (torch.cdist(x, x).sum((1, 2)) / (n * (n - 1))).mean().item()


@torch.no_grad()
def check_spread(model, problem, batch, renders, signals, n, seed, steps=50):
    """3. The spread of the x0 estimates of one context's samples along DDIM, model against exact denoiser."""
    B, oracle = renders.shape[0], model.kind == "oracle"
    many, many_renders, many_signals = repeated(batch, renders, signals, n)
    ctxt_obs, ctxt_params, trgt_params = many["ctxt_obs"], many["ctxt_params"], many["trgt_params"]
    x0 = exact_denoiser(problem, many, many_renders, many_signals, "signal" if oracle else "obs")
    exact = dfm.DFM(ExactDenoiser(x0), dfm.identity, model.timesteps)
    best = None if oracle else best_dfm(problem, many, many_renders, many_signals, model.timesteps)
    see = (lambda s: problem.forward(s, trgt_params)) if oracle else (lambda o: o)
    shape = (B * n, *(signals if oracle else renders).shape[2:])
    x_model = x_exact = x_best = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    abar = torch.cat([model.abar, model.abar.new_ones(1)])
    ts = torch.linspace(model.timesteps - 1, 0, steps).round().long().tolist()
    print(f"3. spread of the x0 estimates of one context's {n} samples along DDIM ({steps} steps, {B} contexts); "
          f"the exact posterior's: {spread(renders):.4f}")
    print("   step  t     model   exact denoiser")
    rows = {}
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1])):
        tb = torch.full((B * n,), t, dtype=torch.long)
        _, x0_model = model.denoise(ctxt_obs, ctxt_params, x_model, trgt_params, tb)
        _, x0_exact = exact.denoise(ctxt_obs, ctxt_params, x_exact, trgt_params, tb)
        x_model = dfm.ddim_step(x_model, x0_model, abar[t], abar[t_prev], 0.0, None)
        x_exact = dfm.ddim_step(x_exact, x0_exact, abar[t], abar[t_prev], 0.0, None)
        rows[t] = dict(model=spread(see(x0_model).reshape(B, n, -1)), exact=spread(see(x0_exact).reshape(B, n, -1)))
        if best is not None:
            _, x0_best = best.denoise(ctxt_obs, ctxt_params, x_best, trgt_params, tb)
            x_best = dfm.ddim_step(x_best, x0_best, abar[t], abar[t_prev], 0.0, None)
            rows[t]["best_dfm"] = spread(x0_best.reshape(B, n, -1))
        if i % 5 == 0 or t_prev < 0:
            print(f"   {i:<5d} {t:<5d} {rows[t]['model']:.4f}  {rows[t]['exact']:.4f}" +
                  (f"  {rows[t]['best_dfm']:.4f} (best DFM denoiser)" if best is not None else ""))
    return rows


TOYS = ("gp1d", "flatland", "motion", "gan_inversion")


def check_options(args):
    """One line naming the option and what it allows, before anything is loaded."""
    rules = [("n-contexts", args.n_contexts >= 1, "an integer >= 1"), ("n-samples", args.n_samples >= 2, ">= 2"),
             ("exact", args.exact >= 2, ">= 2"), ("steps", 1 <= args.steps <= 1000, "in [1, 1000]"),
             ("seed", 0 <= args.seed < 2 ** toy_problems.SEED_BITS, f"in [0, 2^{toy_problems.SEED_BITS})")]
    for name, ok, allowed in rules:
        if not ok:
            raise ValueError(f"--{name} must be {allowed}, got {getattr(args, name.replace('-', '_'))}")


def main():
    parser = argparse.ArgumentParser(prog="python -m experiments.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint of a 2D toy (gp1d, flatland, motion, gan_inversion)")
    parser.add_argument("--oracle", help="also diagnose this oracle checkpoint of the same problem (default: none)")
    parser.add_argument("--n-contexts", type=int, default=16, help="held-out contexts (default 16)")
    parser.add_argument("--n-samples", type=int, default=32, help="samples per context (default 32)")
    parser.add_argument("--exact", type=int, default=1024,
                        help="M, exact posterior samples per context behind the exact denoiser (default 1024)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of check 3 (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="held-out stream and sampling seed (default 0)")
    parser.add_argument("--save", metavar="JSON", help="also write every number to this results file, for "
                        "RESULTS.md's tables (python -m experiments.bench --readme) (default: print only)")
    args = parser.parse_args()
    with toy_problems.one_line_exit():
        check_options(args)
        model, cfg = train.load_ema_model(args.checkpoint)
        oracle, oracle_cfg = train.load_ema_model(args.oracle) if args.oracle else (None, cfg)
        if cfg.problem not in TOYS or cfg.data:
            raise ValueError(f"{args.checkpoint} is a {cfg.problem} checkpoint; this diagnoses {', '.join(TOYS)} "
                             "(the 3D model has its own: python -m experiments.diagnose3d)")
        if oracle_cfg.problem != cfg.problem or (oracle is not None and oracle.kind != "oracle"):
            raise ValueError(f"--oracle {args.oracle} must be an oracle checkpoint of {cfg.problem}, "
                             f"got a {oracle_cfg.model} model of {oracle_cfg.problem}")
        run(model, oracle, cfg, oracle_cfg, args)


def run(model, oracle, cfg, oracle_cfg, args):
    """The three checks, on the held-out contexts of args.seed."""
    problem = toy_problems.load(cfg.problem)
    batch = problem.held_out_batch(args.n_contexts, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    signals = problem.exact_posterior(batch["ctxt_obs"], batch["ctxt_params"], args.exact, generator)
    renders = target_renders(problem, batch, signals)  # (B, M, *obs_shape)
    exact_a = target_renders(problem, batch, problem.exact_posterior(  # a reference set and FLOOR_SETS others
        batch["ctxt_obs"], batch["ctxt_params"], (1 + FLOOR_SETS) * args.n_samples, generator))
    print(f"{cfg.problem}: {args.checkpoint} ({model.kind})" + (f", {args.oracle} (oracle)" if oracle else ""))
    floor, floor_sd, samplers = check_sampler(problem, batch, renders, signals, exact_a, args.n_samples, args.seed,
                                    model.timesteps)
    command = "python -m experiments.diagnose " + " ".join(sys.argv[1:])
    results = dict(problem=f"diagnose-{cfg.problem}", command=command,
                   machine=tables.machine(), steps={m.kind: c.steps for m, c in ((model, cfg), (oracle, oracle_cfg))
                                                    if m is not None},
                   floor=floor, floor_sd=floor_sd, samplers=samplers, x0={}, spread={})
    for m in (model, oracle) if oracle else (model,):
        samplers.update(check_own(m, problem, batch, renders, exact_a, args.n_samples, args.seed))
        results["x0"][m.kind] = check_x0(m, problem, batch, renders, signals, args.seed)
        results["spread"][m.kind] = check_spread(m, problem, batch, renders, signals, args.n_samples, args.seed,
                                                 args.steps)
    if args.save:
        tables.write_json(results, args.save)
        print(f"results: {args.save}")


if __name__ == "__main__":
    main()
