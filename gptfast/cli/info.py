"""`gptfast info`: config, parameter count and which op backend runs each op."""

from __future__ import annotations

from gptfast.cli._common import load_model_for_cli


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="config, parameter count and op backends")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="any checkpoint `gptfast generate --checkpoint` accepts")
    src.add_argument("--preset", help="a preset name (random weights)")
    p.add_argument("--device", default="cpu", help="device type to resolve backends for")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from gptfast import __version__, ops

    model, _, what = load_model_for_cli(args)
    print(f"gptfast {__version__}  torch {torch.__version__}")
    print(f"model: {what}")
    for k, v in model.config.to_dict().items():
        print(f"  {k:16s} {v}")
    print(f"  parameters       {model.num_params():,}")
    device = torch.device(args.device).type
    print(f"backends on {device} (requested: {ops.requested_backend()}):")
    for op in ops.OPS:
        chosen, status = ops.explain(op, device)
        print(f"  {op:18s} -> {chosen}")
        for name, line in status.items():
            print(f"      {name:10s} {line}")
    return 0
