"""`gptfast` command line: generate, info, train, perplexity, bench, attention-map, export-gguf, quantize.

One module per subcommand (`gptfast/cli/<name>.py`), each with `add_parser(sub)` declaring its
flags and `run(args)` running it; shared helpers in `gptfast/cli/_common.py`. The features they call
take plain arguments and never import the CLI (docs/ARCHITECTURE.md).

User errors -- a `gptfast.errors.UserError`, raised on purpose (missing file, bad preset, unknown
character, ...) -- print one line `gptfast: error: ...` and exit with status 2, with nothing
written to stdout first; set GPTFAST_DEBUG=1 to see their traceback. Any other exception is a bug
in gptfast: it keeps its traceback, followed by how to report it (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys

from gptfast.cli import attention_map, bench, export_gguf, generate, info, perplexity, quantize, train
from gptfast.cli._common import load_model_for_cli
from gptfast.errors import UserError

REPORT_BUG = ("gptfast: internal error -- this is a bug in gptfast, not a problem with your input. "
              "Please report it on the gptfast issue tracker with the command line, the traceback above "
              "and the output of `gptfast info`.")

# In the order `gptfast --help` lists them.
SUBCOMMANDS = (generate, info, train, perplexity, bench, attention_map, export_gguf, quantize)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default: "(default: X)" is added to each help line that does not
    already say its default in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_parser = sub.add_parser

    def add_parser(*a, **kw):  # every subcommand's --help lists the defaults
        kw.setdefault("formatter_class", _HelpFormatter)
        p = _add_parser(*a, **kw)
        p.set_defaults(_subcommand=module)
        return p

    sub.add_parser = add_parser
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def _fit_threads() -> None:
    """On a machine where other processes hold cores, use only the free ones (gptfast.threads)."""
    from gptfast.threads import fit_threads_to_free_cores

    got = fit_threads_to_free_cores()
    if got is not None:
        before, after, others = got
        print(f"gptfast: other processes are using {others:.1f} of {os.cpu_count()} cores: "
              f"{after} thread(s) instead of {before} (set OMP_NUM_THREADS to choose)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(getattr(args, "_subcommand", None), "FIT_THREADS", False):
            _fit_threads()
        return int(args.func(args) or 0)
    except UserError as e:
        if os.environ.get("GPTFAST_DEBUG") == "1":
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"gptfast: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `gptfast info | head`: the reader left, not an error of ours
        sys.stderr.close()
        return 0
    except Exception:  # noqa: BLE001 - anything else is our bug: keep the traceback, say so
        import traceback

        traceback.print_exc()
        print(REPORT_BUG, file=sys.stderr)
        return 1


__all__ = ["REPORT_BUG", "build_parser", "load_model_for_cli", "main"]
