"""`gptfast train`: its flags (every TrainConfig field, every GPTConfig field as an override) and
the glue to `gptfast.train.train`. DDP: `torchrun --nproc_per_node 2 -m gptfast.cli train ...`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gptfast.cli._common import add_backend_arg
from gptfast.config import GPTConfig
from gptfast.errors import InputError
from gptfast.train import PLOT_NAME, TrainConfig, plot_history, read_history, train


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (see `gptfast train --help`)",
        description="Train a GPT on a text file; DDP when launched with torchrun.",
    )
    add_arguments(p)
    add_backend_arg(p)
    p.set_defaults(func=run)


def add_arguments(p) -> None:
    """Declare `gptfast train`'s arguments on an argparse parser."""
    d = TrainConfig()
    p.add_argument("--preset", default=d.preset, help="model preset (see gptfast.config.PRESETS)")
    p.add_argument("--data", help="UTF-8 text file to train on (90%% train / 10%% val)")
    p.add_argument("--out-dir", default=d.out_dir,
                   help="checkpoint directory (created if missing; only gptfast's own files in it are "
                        "written or replaced, everything else is left alone)")
    p.add_argument("--tokenizer", default=d.tokenizer, choices=["auto", "char", "gpt2"],
                   help="auto: GPT-2 BPE for presets with a 50257 vocabulary, else characters of --data")
    helps = {
        "max_iters": "optimizer steps in total (a resumed run continues up to this step)",
        "eval_interval": "evaluate and save a checkpoint every this many steps (and at the end)",
        "eval_iters": "batches per split averaged by each evaluation",
        "log_interval": "steps between log lines when there is no progress bar",
        "batch_size": "sequences per micro-batch (per process under DDP)",
        "grad_accum": "micro-batches accumulated per optimizer step",
        "warmup_iters": "linear learning-rate warmup steps",
        "lr_decay_iters": "step at which the cosine decay reaches --min-lr (default: --max-iters)",
        "seed": "seed of the initial weights, the batch sampler and dropout",
        "lr": "peak learning rate (AdamW)",
        "min_lr": "learning rate at the end of the cosine decay",
        "weight_decay": "AdamW weight decay (weight matrices only)",
        "beta1": "AdamW beta1",
        "beta2": "AdamW beta2",
        "grad_clip": "clip the gradient norm to this (0 = off)",
    }
    for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                 "grad_accum", "warmup_iters", "lr_decay_iters", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=helps[name])
    for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name), help=helps[name])
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out-dir (prints the step and losses it resumes from)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16"],
                   help="bf16: autocast mixed precision (CUDA only)")
    p.add_argument("--plot", action="store_true",
                   help="save loss.png in --out-dir (without --data: plot an existing run)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    # Every GPTConfig field as an override flag: --n-layer 6, --dropout 0.1, --bias false ...
    model = p.add_argument_group("model overrides (GPTConfig fields; default: the preset's)")
    for f in dataclasses.fields(GPTConfig):
        if not f.init:
            continue
        kind = _field_parser(f)
        model.add_argument("--" + f.name.replace("_", "-"), dest="model_" + f.name, type=kind,
                           default=None, metavar=f.name.upper(),
                           help=f"GPTConfig.{f.name} ({kind.__name__.lstrip('_')}; default: the preset's)")


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise InputError(f"expected true/false, got {s!r}")


def _field_parser(f: dataclasses.Field):
    t = str(f.type)
    if "bool" in t:
        return _parse_bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def config_from_args(args) -> TrainConfig:
    overrides = {k[len("model_"):]: v for k, v in vars(args).items()
                 if k.startswith("model_") and v is not None}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["progress"] = not args.no_progress
    return TrainConfig(model_overrides=overrides, **kw)


def run(args) -> int:
    """`gptfast train` (args from `add_arguments`)."""
    cfg = config_from_args(args)
    if cfg.data is None and cfg.plot:  # plot an existing run
        p = plot_history(read_history(cfg.out_dir), Path(cfg.out_dir) / PLOT_NAME)
        print(f"loss plot written to {p}")
        return 0
    result = train(cfg)
    if result["val_loss"] is not None:
        print(f"step {result['step']}: train loss {result['train_loss']:.4f}, "
              f"val loss {result['val_loss']:.4f}; {result['ms_per_iter']:.1f} ms/iter, "
              f"{result['tokens_per_s']:.0f} tokens/s; checkpoint in {result['out_dir']}")
    return 0
