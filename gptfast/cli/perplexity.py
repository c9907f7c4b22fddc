"""`gptfast perplexity`: sliding-window perplexity of a text file (gptfast.perplexity)."""

from __future__ import annotations

from gptfast.cli._common import add_backend_arg, load_model_for_cli
from gptfast.data import load_text
from gptfast.errors import InputError
from gptfast.perplexity import sliding_window_perplexity

FIT_THREADS = True  # main() fits torch's threads to the free cores first (gptfast.threads)


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    add_arguments(p)
    add_backend_arg(p)
    p.set_defaults(func=run)


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", help="gptfast checkpoint (default: the embedded Shakespeare model)")
    p.add_argument("--text-file", required=True, help="UTF-8 text to score")
    p.add_argument("--max-length", type=int, default=None, help="window length (default: block size)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: max-length / 2)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (memory: batch x max-length x vocab logits)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def run(args) -> int:
    model, tokenizer, what = load_model_for_cli(args)
    if getattr(args, "backend", None):
        model.backend = args.backend
    model.to(args.device)
    text = load_text(args.text_file)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise InputError(f"--text-file {args.text_file} holds {len(ids)} token(s); need at least 2")
    max_length = args.max_length
    if max_length is not None and max_length > model.config.block_size:
        raise InputError(f"--max-length {max_length} exceeds the model's block size {model.config.block_size}")
    nwin = len(ids) // max(1, args.stride or (max_length or model.config.block_size) // 2)
    ppl, n = sliding_window_perplexity(model, ids, max_length=max_length, stride=args.stride,
                                       batch_size=args.batch_size, progress=nwin > 64)
    L = max_length or model.config.block_size
    print(f"perplexity {ppl:.4f}  ({n} tokens scored, max_length {L}, "
          f"stride {args.stride or max(1, L // 2)}; {what})")
    return 0
