"""Training loop for gptfast models (after nanoGPT's train.py, without its `exec` configurator).

    from gptfast.train import TrainConfig, train
    train(TrainConfig(data="input.txt", out_dir="out", preset="tiny", max_iters=200))

    gptfast train --preset shakespeare-char --data input.txt --out-dir out --n-layer 4
    torchrun --nproc_per_node 2 -m gptfast.cli train ...      # DDP (gloo on CPU, nccl on GPU)

What it does, in order: tokenize the text (char vocabulary from the text, or GPT-2 BPE for the
GPT-2 presets), split 90/10, sample random blocks (`gptfast.data.BatchSampler`), AdamW with weight
decay on weight matrices only, linear warmup then cosine decay to `min_lr`, gradient accumulation,
gradient clipping, periodic `estimate_loss`, and an atomic checkpoint (see `gptfast.io.checkpoint`)
at every evaluation and at the end.

Exact resume: the checkpoint holds the optimizer state, the iteration number and, for every rank,
the training sampler's generator state and the global torch RNG state (dropout). Evaluation draws
its batches from a separate, freshly seeded sampler, so evaluating (or not) never changes the
training trajectory: 20 steps == 10 steps + resume + 10 steps, bit for bit on CPU fp32, provided
the LR schedule is the same (`lr_decay_iters`, which defaults to `max_iters`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gptfast.config import PRESETS, GPTConfig
from gptfast.errors import (InputError, InputFileError, MissingDependencyError, MissingFileError, NonFiniteError,
                            OutDirError)
from gptfast.data import BatchSampler, encode_file, load_text, train_val_split
from gptfast.io import checkpoint as ckpt
from gptfast.io.atomic import write_file_atomic
from gptfast.model import GPT
from gptfast.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer

PLOT_NAME = "loss.png"


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults follow nanoGPT's shakespeare_char config,
    scaled for a CPU."""

    data: str | None = None  # UTF-8 text file
    out_dir: str = "out"  # checkpoint directory (also holds history.json and loss.png)
    preset: str = "shakespeare-char"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields
    tokenizer: str = "auto"  # auto | char | gpt2 (auto: gpt2 when the preset's vocab is 50257)
    # schedule
    max_iters: int = 2000
    eval_interval: int = 250
    eval_iters: int = 50
    log_interval: int = 10
    # batch
    batch_size: int = 12
    grad_accum: int = 1
    # optimizer: AdamW (Loshchilov & Hutter 2019), betas as nanoGPT's small-model configs
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 = off
    # system
    resume: bool = False
    backend: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | bf16 (autocast, CUDA only)
    seed: int = 1337
    plot: bool = False
    progress: bool = True  # tqdm bar; False prints a line every log_interval steps
    save_train_state: bool = True

    def validate(self) -> None:
        positive = ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                    "grad_accum")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise InputError(f"TrainConfig.lr_decay_iters must be > 0, got {self.lr_decay_iters}")
        if self.warmup_iters < 0:
            raise InputError(f"TrainConfig.warmup_iters must be >= 0, got {self.warmup_iters}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise InputError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise InputError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if self.preset not in PRESETS:
            raise InputError(f"unknown preset {self.preset!r}; expected one of: {', '.join(PRESETS)}")
        if self.tokenizer not in ("auto", "char", "gpt2"):
            raise InputError(f"tokenizer must be 'auto', 'char' or 'gpt2', got {self.tokenizer!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise InputError(f"dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        known = {f.name for f in dataclasses.fields(GPTConfig) if f.init}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise InputError(f"unknown model field(s) {unknown}; known: {sorted(known)}")


# ----------------------------------------------------------------------------- pieces


def get_lr(it: int, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """Learning rate at iteration `it` (nanoGPT): linear warmup from lr/warmup_iters to lr over
    `warmup_iters` steps, cosine decay from lr to min_lr until `lr_decay_iters`, then min_lr."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay only the weight matrices of Linear layers. Biases, LayerNorm gains
    and embeddings (token and position; with tying, also the LM head, which *is* the token
    embedding) are not decayed -- shrinking them towards 0 has no regularising meaning
    (the GPT-3 / minGPT convention)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # shared tensors are listed once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), foreach=False)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast (matmuls in bf16, reductions / the loss in fp32; CUDA only); fp32: no-op."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def estimate_loss(model: nn.Module, sampler: BatchSampler, eval_iters: int,
                  ctx=None) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for split in BatchSampler.SPLITS:
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y = sampler.get_batch(split)
                with ctx or contextlib.nullcontext():
                    _, loss = model(x, y)
                losses[k] = loss.item()
            out[split] = float(losses.mean())
    finally:
        model.train(was_training)
    return out


def build_tokenizer(kind: str, preset_vocab: int, text: str) -> Tokenizer:
    if kind == "gpt2" or (kind == "auto" and preset_vocab == 50257):
        return GPT2Tokenizer()
    return CharTokenizer.from_text(text)


def encode_data(path: str, tokenizer: Tokenizer) -> np.ndarray:
    """Token ids of the text file; a char tokenizer from a checkpoint must cover the text."""
    try:
        return encode_file(path, tokenizer)
    except ValueError as e:
        if isinstance(tokenizer, CharTokenizer) and "not in the vocabulary" in str(e):
            raise InputError(
                f"--data {path} does not fit the checkpoint's vocabulary "
                f"({tokenizer.vocab_size} characters): {e}"
            ) from None
        raise


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Save a PNG of train / val loss against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("plotting needs matplotlib: pip install matplotlib") from None
    if not history:
        raise InputError("no evaluation history to plot yet")
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["train_loss"] for h in history], label="train", marker=".")
    ax.plot(steps, [h["val_loss"] for h in history], label="val", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:  # the temporary keeps the name's suffix, so matplotlib picks the same format
        return write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)


def read_history(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    if not (Path(out_dir) / ckpt.META_NAME).exists():
        raise InputFileError(f"no eval history in {out_dir} (no checkpoint {ckpt.META_NAME} there)")
    history = ckpt.read_history(out_dir)
    if not history:
        raise InputFileError(f"no eval history in {out_dir} (its checkpoint has none)")
    return history


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Fail before any training if `out_dir` cannot hold a checkpoint: it is a file, a parent is
    a file, or it (or, when missing, the nearest existing parent) is not writable. Writability is
    probed by creating and removing a file of ours (os.access is wrong for root / read-only
    mounts). Creates nothing that stays."""
    d = Path(out_dir).absolute()
    if d.exists() and not d.is_dir():
        raise OutDirError(f"--out-dir {out_dir}: exists and is not a directory")
    probe_dir = d
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutDirError(f"--out-dir {out_dir}: {probe_dir} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".gptfast-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        what = "" if probe_dir == d else f" (cannot create it in {probe_dir})"
        raise OutDirError(f"--out-dir {out_dir}: not writable{what}: {e.strerror}") from None


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return _Dist()
    import torch.distributed as dist

    dev_type = torch.device(device).type
    backend = "nccl" if dev_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    d = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)
    if dev_type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def _gather_objects(dist_info: _Dist, obj: Any) -> list[Any]:
    if not dist_info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- the loop


def _prepare(cfg: TrainConfig, device: torch.device):
    """Load data, tokenizer, model and (on resume) the saved state. Everything that can fail
    on bad input fails here, before anything is written."""
    if cfg.data is None:
        raise InputError("--data is required: a UTF-8 text file to train on")
    text = load_text(cfg.data)  # missing / empty / not UTF-8 -> clear error
    resume_state = None
    history: list[dict[str, Any]] = []
    if cfg.resume:
        out = Path(cfg.out_dir)
        if not (out / ckpt.META_NAME).exists() and not ckpt._backup_paths(out.absolute()):
            raise MissingFileError(f"--resume: no checkpoint in {cfg.out_dir}")
        model, tokenizer, info = ckpt.load_checkpoint(out)
        for k, v in cfg.model_overrides.items():
            if k in info["config"] and info["config"][k] != v:
                raise InputError(f"--resume: the checkpoint has {k}={info['config'][k]!r}, "
                                 f"but {k}={v!r} was given")
        if cfg.tokenizer != "auto" and cfg.tokenizer != info["tokenizer"].get("type"):
            raise InputError(f"--resume: the checkpoint's tokenizer is {info['tokenizer'].get('type')!r}, "
                             f"but --tokenizer {cfg.tokenizer} was given")
        resume_state = ckpt.load_train_state(out)
        resume_state["_meta"] = {k: info.get(k) for k in ("step", "train_loss", "val_loss")}
        history = ckpt.read_history(out)
        model.train()
    else:
        preset_vocab = PRESETS[cfg.preset].get("vocab_size", GPTConfig.vocab_size)
        tokenizer = build_tokenizer(cfg.tokenizer, preset_vocab, text)
        overrides = dict(cfg.model_overrides)
        vocab = overrides.setdefault("vocab_size", tokenizer.vocab_size)
        if vocab < tokenizer.vocab_size:
            raise InputError(f"--vocab-size {vocab} is smaller than the tokenizer's vocabulary "
                             f"({tokenizer.vocab_size})")
        config = GPTConfig.from_preset(cfg.preset, **overrides)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model = GPT(config)
    ids = encode_data(cfg.data, tokenizer)
    if len(ids) < 2:
        raise InputError(f"--data {cfg.data} holds only {len(ids)} token(s); too short to train on")
    train_ids, val_ids = train_val_split(ids)
    bs = model.config.block_size
    for split, arr in (("train", train_ids), ("val", val_ids)):
        if len(arr) <= bs:
            raise InputError(
                f"--data {cfg.data} is too short: its {split} split (90/10) has {len(arr)} tokens, "
                f"need more than block_size={bs}"
            )
    if int(ids.max()) >= model.config.vocab_size:
        raise InputError(f"token id {int(ids.max())} >= vocab_size {model.config.vocab_size}")
    return model, tokenizer, train_ids, val_ids, resume_state, history


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns {"step", "train_loss", "val_loss", "history", "out_dir"}."""
    cfg.validate()
    dist_info = _init_distributed(cfg.device)
    device = torch.device(cfg.device if not (dist_info.enabled and cfg.device == "cuda")
                          else f"cuda:{dist_info.local_rank}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available in this torch build / machine")
    if cfg.dtype == "bf16" and device.type != "cuda":
        # CPU autocast runs, but measured ~10x slower than fp32 here with the torch backend and
        # the native ops reject its mixed fp32/bf16 inputs: refuse instead of surprising.
        raise InputError(f"--dtype bf16 (autocast) is supported on CUDA only, got --device {cfg.device}; "
                         "use --dtype fp32 on CPU")
    check_out_dir(cfg.out_dir)  # before any data is read or any step is run
    model, tokenizer, train_ids, val_ids, resume_state, history = _prepare(cfg, device)
    if cfg.backend is not None:
        model.backend = cfg.backend
    model.to(device)
    model.train()
    lr_decay_iters = cfg.lr_decay_iters or cfg.max_iters
    optimizer = make_optimizer(model, cfg)

    # Training batches: a different stream per rank; eval batches: a fixed stream shared by all.
    sampler = BatchSampler(train_ids, val_ids, model.config.block_size, cfg.batch_size,
                           device=device, seed=cfg.seed + 1000 * dist_info.rank + 1)
    torch.manual_seed(cfg.seed + 1000 * dist_info.rank + 2)  # dropout stream (per rank)
    iter_num = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        iter_num = int(resume_state["iter_num"])
        ranks = resume_state.get("ranks", [])
        if len(ranks) == dist_info.world_size:
            mine = ranks[dist_info.rank]
            sampler.load_state_dict(mine["sampler"])
            torch.set_rng_state(mine["torch_rng"])
            if device.type == "cuda" and mine.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(mine["cuda_rng"], device)
        elif dist_info.master:
            print(f"gptfast train: checkpoint saved with {len(ranks)} rank(s), now "
                  f"{dist_info.world_size}: RNG streams are reseeded", file=sys.stderr)

    raw_model = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    ctx = autocast_context(device, cfg.dtype)
    out_dir = Path(cfg.out_dir)

    def eval_sampler() -> BatchSampler:
        return BatchSampler(train_ids, val_ids, raw_model.config.block_size, cfg.batch_size,
                            device=device, seed=cfg.seed + 7)

    def save(losses: dict[str, float] | None) -> None:
        rank_states = _gather_objects(dist_info, {
            "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        })
        if not dist_info.master:
            return
        state = None
        if cfg.save_train_state:
            state = {"optimizer": optimizer.state_dict(), "iter_num": iter_num, "ranks": rank_states,
                     "train_config": dataclasses.asdict(cfg)}
        meta: dict[str, Any] = {"step": iter_num, "preset": cfg.preset}
        if losses:
            meta.update(train_loss=losses["train"], val_loss=losses["val"])
        ckpt.save_checkpoint(out_dir, raw_model, tokenizer, train_state=state, history=history, **meta)

    def evaluate() -> dict[str, float]:
        losses = estimate_loss(raw_model, eval_sampler(), cfg.eval_iters, ctx)
        history.append({"step": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                        "lr": get_lr(iter_num, cfg.lr, cfg.min_lr, cfg.warmup_iters, lr_decay_iters),
                        "time": time.time()})
        return losses

    tokens_per_iter = cfg.batch_size * raw_model.config.block_size * cfg.grad_accum * dist_info.world_size
    bar = None
    # A bar on a terminal; in a log (stderr not a terminal) a line every log_interval steps.
    if dist_info.master and cfg.progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_iters, initial=iter_num, desc="train", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)

    def say(msg: str) -> None:
        if not dist_info.master:
            return
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    if dist_info.master and resume_state is not None:
        m = resume_state.get("_meta") or {}
        losses_txt = ", ".join(f"{k.replace('_', ' ')} {m[k]:.4f}" for k in ("train_loss", "val_loss")
                               if isinstance(m.get(k), (int, float)))
        say(f"gptfast train: resumed from step {iter_num} of {cfg.out_dir}"
            + (f" ({losses_txt})" if losses_txt else ""))
    if dist_info.master:
        say(f"gptfast train: {raw_model.num_params():,} parameters, {len(train_ids):,} train / "
            f"{len(val_ids):,} val tokens, {tokens_per_iter:,} tokens/iter, "
            f"world size {dist_info.world_size}, backend {cfg.backend or 'default'}")
    losses: dict[str, float] | None = None
    loss_val = float("nan")
    train_time, iters_run = 0.0, 0  # seconds spent in training steps (evaluation excluded)
    t_last = time.perf_counter()
    try:
        while iter_num < cfg.max_iters:
            lr = get_lr(iter_num, cfg.lr, cfg.min_lr, cfg.warmup_iters, lr_decay_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = sampler.get_batch("train")
                # DDP: all-reduce gradients only on the last micro-step of the accumulation.
                sync = (not dist_info.enabled or micro == cfg.grad_accum - 1)
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with ctx:
                        _, loss = model(x, y)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            loss_val = loss_sum / cfg.grad_accum
            if not math.isfinite(loss_val):
                raise NonFiniteError(f"training diverged: loss is {loss_val} at step {iter_num} "
                                         "(lower --lr?)")
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            train_time, iters_run = train_time + dt, iters_run + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", ms_iter=f"{dt * 1e3:.0f}",
                                tok_s=f"{tokens_per_iter / dt:.0f}", refresh=False)
            elif iter_num % cfg.log_interval == 0:
                say(f"step {iter_num}: loss {loss_val:.4f}, {dt * 1e3:.0f} ms/iter, "
                    f"{tokens_per_iter / dt:.0f} tok/s, lr {lr:.2e}")
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                if dist_info.master:
                    losses = evaluate()
                    say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                save(losses)
                t_last = time.perf_counter()  # keep eval time out of ms/iter
    finally:
        if bar is not None:
            bar.close()
    if losses is None and dist_info.master:  # nothing to do (resumed at max_iters)
        losses = evaluate()
    if dist_info.master and cfg.plot:
        p = plot_history(history, out_dir / PLOT_NAME)
        say(f"gptfast train: loss plot written to {p}")
    result = {"step": iter_num, "train_loss": losses["train"] if losses else None,
              "val_loss": losses["val"] if losses else None, "last_loss": loss_val,
              "history": history, "out_dir": str(out_dir), "model": raw_model,
              "ms_per_iter": 1e3 * train_time / max(1, iters_run),
              "tokens_per_s": tokens_per_iter * iters_run / max(train_time, 1e-9)}
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
    return result
