"""What a training run is: its configuration, checked, and the command-line help of every option.

train.py trains a Config; sample.py, experiments/bench.py and experiments/study.py make one with make_config. A
Config is everything a run depends on and is saved in every checkpoint: a problem's
TRAIN_DEFAULTS override the defaults below, and the command line (or the caller) overrides
both. validate() refuses, with one line naming the option and what it allows, any setting
that cannot work, before anything is trained or written.
"""
import dataclasses
import inspect
import os
import sys
from dataclasses import dataclass

import torch

import toy_problems
from posed_images.formats import READERS


@dataclass
class Config:
    """Everything a run depends on; saved in every checkpoint. A problem's TRAIN_DEFAULTS override
    these defaults, and the command line overrides both (see make_config)."""
    problem: str = "flatland"  # which toy problem (a module of toy_problems/)
    model: str = "dfm"  # dfm | deterministic | oracle
    steps: int = 2000  # optimisation steps
    batch_size: int = 32  # examples per step, over all processes
    lr: float = 1e-3  # Adam learning rate after warm-up
    warmup: int = 200  # steps of linear learning-rate warm-up
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 at the last step)
    grad_clip: float = 1.0  # clip the gradient norm at this value
    ema_decay: float = 0.995  # EMA of the weights, used for sampling
    timesteps: int = 1000  # diffusion steps T
    ctxt_drop_prob: float = 0.0  # probability of hiding the context, for classifier-free guidance
    novel_weight: float = 1.0  # weight of the novel-view loss term (DFM and the deterministic model)
    contexts: int = 0  # context views per example drawn from 1..contexts each step (0 = the problem's own rule)
    signals: int = 0  # train on a fixed data set of this many signals (0 = a new signal for every example)
    views: int = 0  # observations of each signal in that data set (0 with signals = 0)
    forward_error: str = "none"  # a forward model unlike the data's, for training and sampling (FORWARD_ERRORS)
    forward_error_size: float = 0.0  # how far off that forward model is
    precision: str = "auto"  # fp32 | bf16 (autocast; compositing stays float32) | auto (bf16_by_default)
    eval_every: int = 1000  # steps between quick evaluations against the exact posterior (0 = never)
    ckpt_every: int = 500  # steps between checkpoints
    seed: int = 0
    out_dir: str = ""  # where ckpt.pt goes; "" = out/<problem>-<model>
    device: str = ""  # "" = cuda if available, else cpu
    data: str = ""  # posed images on disk to train the 3D model on (posed_images/); "" = the problem's own scenes
    format: str = ""  # the format of --data: re10k | co3d | blender
    frame_window: int = 0  # with --data: target and novel frames at most this many frames from the context (0 = any)
    workers: int = 2  # with --data: DataLoader worker processes that decode images and make batches ahead

    def validate(self, world=1):
        """A ValueError naming the option and what it allows, for any setting that cannot work
        (world: the number of processes). Every comparison with NaN is False, so NaN fails too."""
        if self.problem not in toy_problems.PROBLEMS:
            raise ValueError(f"--problem must be one of {', '.join(toy_problems.PROBLEMS)}, got {self.problem!r}")
        problem = toy_problems.load(self.problem)
        rules = [
            ("model", self.model in MODELS, "one of " + ", ".join(MODELS)),
            ("steps", self.steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1 and self.batch_size % world == 0,
             "an integer >= 1" + (f" divisible by the number of processes ({world})" if world > 1 else "")),
            ("lr", self.lr > 0, "a number > 0"),
            ("warmup", self.warmup >= 0, "an integer >= 0 (0 = no warm-up)"),
            ("lr_schedule", self.lr_schedule in ("constant", "cosine"), "constant or cosine"),
            ("grad_clip", self.grad_clip > 0, "a number > 0"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("timesteps", self.timesteps >= 1, "an integer >= 1"),
            ("ctxt_drop_prob", 0 <= self.ctxt_drop_prob < 1, "in [0, 1)"),
            ("novel_weight", self.novel_weight >= 0, "a number >= 0 (0 = no novel-view term)"),
            ("precision", self.precision in ("fp32", "bf16", "auto"), "fp32, bf16 or auto"),
            ("contexts", self.contexts == 0 or (self.contexts >= 1 and self.signals == 0 and
                                               "n_ctxt" in inspect.signature(problem.sample_batch).parameters),
             "0 (the problem's rule), or >= 1 for gp1d and flatland without --signals"),
            ("signals", self.signals == 0 or (self.signals >= 1 and hasattr(problem, "sample_views")),
             "0 (a new signal every time), or >= 1 for gp1d and flatland"),
            ("views", self.views == 0 if self.signals == 0 else self.views >= 2,
             "0 without --signals, and >= 2 with it (a context and a target)"),
            ("forward_error", self.forward_error in ("none", *getattr(problem, "FORWARD_ERRORS", ())),
             "none, or for this problem one of: " + (", ".join(getattr(problem, "FORWARD_ERRORS", ())) or "(none)")),
            ("forward_error_size", self.forward_error_size == 0 or self.forward_error != "none",
             "0 with --forward-error none"),
            ("eval_every", self.eval_every >= 0, "an integer >= 0 (0 = never)"),
            ("ckpt_every", self.ckpt_every >= 1, "an integer >= 1"),
            ("seed", 0 <= self.seed < 2 ** toy_problems.SEED_BITS, f"in [0, 2^{toy_problems.SEED_BITS})"),
            ("data", not self.data or (self.problem.startswith("scenes3d") and os.path.exists(self.data)),
             "an existing file or folder of posed images (README, Your own data), with --problem scenes3d, "
             "scenes3d-64 or scenes3d-128"),
            ("format", self.format in READERS if self.data else self.format == "",
             f"one of {', '.join(READERS)} with --data, and not given without it"),
            ("frame_window", self.frame_window >= 0 and (self.frame_window == 0 or self.data),
             "an integer >= 0 (0 = any frame of the sequence), with --data"),
            ("workers", self.workers >= 0, "an integer >= 0 (0 = make batches in the training process)"),
        ]
        for name, ok, allowed in rules:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)!r}")
        if self.forward_error != "none":
            problem.forward_with_error(self.forward_error, self.forward_error_size)  # its own check of the size
        check_device(self.device)


MODELS = ["dfm", "deterministic", "oracle"]
# What may change when a run is resumed: how long it runs, how often it scores and saves, where it
# runs and writes. Everything else defines the model, its data stream or its optimisation.
RESUMABLE = ("steps", "ckpt_every", "eval_every", "device", "precision", "out_dir", "workers")


def make_config(problem="flatland", **overrides):
    """The config of a new run: Config's defaults, then the problem's TRAIN_DEFAULTS, then the overrides."""
    defaults = toy_problems.load(problem).TRAIN_DEFAULTS
    unknown = set(defaults) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{problem}.TRAIN_DEFAULTS sets unknown config fields: {', '.join(sorted(unknown))}")
    return resolve(Config(problem=problem, **{**defaults, **overrides}))


def resolve(cfg):
    """Fill in what depends on the machine or on other fields: the output folder, device and precision."""
    cfg.out_dir = cfg.out_dir or os.path.join("out", f"{cfg.problem}-{cfg.model}")
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.precision == "auto":
        cfg.precision = "bf16" if bf16_by_default(cfg.problem, cfg.device) else "fp32"
    return cfg


def bf16_by_default(problem, device):
    """bf16 on a GPU; on the CPU for the 3D problems, whose steps are matrix products, when the CPU has bf16
    instructions (AVX512-BF16 or AMX), where it makes a step about twice as fast (RESULTS.md, 3D scenes). The 2D
    toys stay float32 on the CPU, where their scores were measured."""
    if device.startswith("cuda"):
        return True
    cpu_has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()  # torch's own probes of the CPU
    return problem.startswith("scenes3d") and cpu_has_bf16


def check_device(device):
    """A clear error for a device this machine does not have, before anything is loaded onto it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no GPU available on this machine; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


GPU_SETTINGS = ("scenes3d-64", "scenes3d-128")  # sized for a GPU's memory; check_memory refuses what a CPU cannot hold


def available_memory():
    """Bytes this machine can still give a process: Linux's MemAvailable, or a container's (cgroup v2)
    limit if that is lower; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            free = int(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) * 1024  # given in kB
    except (OSError, KeyError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            free = min(free, int(limit.read()) - int(used.read()))  # "max" (no limit) raises ValueError
    except (OSError, ValueError):
        pass
    return free


def check_memory(cfg, world=1):
    """Refuse a run on the CPU whose training step cannot fit in this machine's memory, before anything is
    written: otherwise the kernel kills it minutes later without a word. Warn when it may not fit.

    The 3D problems count what one example of a step holds (scenes3d_eval.memory_per_sample: weights,
    gradients, Adam, EMA, and every tensor autograd saves); the count leaves out temporaries, so it is a
    lower bound. The other problems need megabytes. On a GPU, torch reports running out of memory itself."""
    if not cfg.problem.startswith("scenes3d") or torch.device(cfg.device).type != "cpu":
        return
    free = available_memory()
    if free is None:
        return
    from toy_problems import scenes3d_eval
    count = scenes3d_eval.memory_per_sample(cfg.problem, cfg.precision)  # bytes of one example (batch 1)
    need = world * count["weights"] + cfg.batch_size * count["activations"]  # processes share the machine's memory
    gib = 2 ** 30
    fits = max(0, int((free / 2 - world * count["weights"]) // count["activations"]))  # leaves room for temporaries
    what = (f"a training step of {cfg.problem} at --batch-size {cfg.batch_size} needs at least {need / gib:.1f} GiB "
            f"({count['activations'] / gib:.2f} GiB per example), and this machine has {free / gib:.1f} GiB free")
    hint = (f"{cfg.problem} is a GPU setting (train it with --device cuda on a GPU, or --problem scenes3d on a "
            "CPU); " if cfg.problem in GPU_SETTINGS else "")
    if need > free:
        raise ValueError(f"{what}: {hint}" + (f"here pass --batch-size {fits} or less" if fits else
                                              "here not even --batch-size 1 leaves room to spare"))
    if need > free / 2 and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {what}; the count leaves out temporaries: if the run is killed, lower --batch-size",
              file=sys.stderr)


# The command line: what each option does and its unit; option_help adds the defaults.
HELP = {
    "problem": "the toy problem to train on; scenes3d-64 and scenes3d-128 are GPU settings (64x64 and 128x128 "
               "images, larger networks: at their default batch a step needs more memory than most CPU machines have, "
               "and train.py refuses one that does not fit), scenes3d is the CPU setting (32x32)",
    "model": "what to train: dfm (the method), deterministic (regression from the context, pixelNeRF-style) "
             "or oracle (conditional diffusion on the true signal, which only a toy can provide)",
    "steps": "optimisation steps in all, a count (on --resume: the new total, more than the checkpoint's step)",
    "batch_size": "examples per step, over all processes (must divide by their number)",
    "lr": "Adam learning rate after warm-up, > 0",
    "warmup": "steps of linear learning-rate warm-up (0 = none)",
    "lr_schedule": "the learning rate after warm-up: constant, or cosine (--lr times (1 + cos(pi step / --steps)) / 2, "
                   "0 at the last step; --steps cannot change on --resume)",
    "grad_clip": "clip the gradient's global L2 norm at this value, > 0",
    "ema_decay": "decay per step of the EMA of the weights that sampling uses, in [0, 1)",
    "timesteps": "diffusion steps T of the noise schedule",
    "ctxt_drop_prob": "probability of hiding an example's context, in [0, 1); > 0 allows sample.py --guidance",
    "novel_weight": "weight of the novel-view term of the DFM and deterministic losses, >= 0 (0 = the target "
                    "view only); any weight > 0 leaves the optimum where it was",
    "contexts": "the most context views per example: each step draws how many from 1..N (gp1d, flatland); "
                "0 = the problem's own rule (gp1d 1..4, flatland 1..3, the others 1)",
    "signals": "train on a fixed data set of this many signals drawn once from the prior (gp1d, flatland); "
               "0 = a new signal for every example",
    "views": "observations of each signal in that data set, >= 2 with --signals (flatland: the context "
             "camera's and views-1 random ones)",
    "forward_error": "train and sample with a forward model that differs from the one that made the data: "
                     "gp1d shift or blur, flatland focal or pose, motion nearest (see each forward_with_error)",
    "forward_error_size": "how far off: gp1d shift in points, blur its sd in points; flatland a relative "
                          "error; motion the share of nearest-neighbour interpolation",
    "precision": "fp32, bf16 (autocast; compositing stays float32) or auto (bf16 on a GPU, and for the 3D "
                 "problems on a CPU with bf16 instructions; else fp32)",
    "eval_every": "steps between quick scores against the exact posterior on the held-out contexts of --seed "
                  "(train.CURVE_EVAL: 16 contexts x 32 samples, 20 DDIM steps), printed and kept in the checkpoint "
                  "as its learning curve (0 = never)",
    "ckpt_every": "steps between checkpoints (one is also written at the end, and on Ctrl-C)",
    "seed": "seed of the initial weights and of the training data stream, an integer in [0, 2^30)",
    "out_dir": "folder for ckpt.pt",
    "device": "cpu, cuda or cuda:N",
    "data": "train the 3D model (--problem scenes3d*) on posed images on disk instead of its toy scenes: a camera "
            "file, a sequence folder, a transforms json or a folder of them (README, Your own data)",
    "format": "the format of --data: re10k (RealEstate10K), co3d (CO3D v2) or blender (NeRF-synthetic)",
    "frame_window": "with --data: the target and novel frames are at most this many frames from the context "
                    "(0 = any frame of the sequence)",
    "workers": "with --data: DataLoader worker processes that decode and cache images and make batches ahead "
               "(0 = none)",
}


def option_help(field, problem_defaults):
    """The help of one Config field: what it does, then its default, the problems' own where they set one."""
    special = {"problem": f"default: {Config.problem}",
               "out_dir": "default: out/<problem>-<model>; on --resume, the checkpoint's folder",
               "device": "default: cuda if this machine has a GPU, else cpu"}
    by_problem = [f"{name} {defaults[field.name]}" for name, defaults in problem_defaults.items()
                  if field.name in defaults]
    if field.name in special:
        default = special[field.name]
    elif by_problem:
        default = f"default: the problem's: {', '.join(by_problem)}; otherwise {field.default}"
    else:
        default = f"default: {field.default}"
    return f"{HELP[field.name]} ({default})"


def problems_for_help():
    """{name: module} of every problem, when --help is asked for (importing them all costs time); a problem
    that fails to import is left out, and using it shows why. sample.py uses it too."""
    problems = {}
    for name in toy_problems.PROBLEMS if {"-h", "--help"} & set(sys.argv[1:]) else []:
        try:
            problems[name] = toy_problems.load(name)
        except Exception:
            pass
    return problems
