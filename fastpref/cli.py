"""fastpref command line. Each subcommand lives in its own module, imported only when chosen."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module with ``add_arguments(parser)`` and ``run(args) -> int``, one-line help)
COMMANDS = {
    "annotate": ("fastpref.annotate.cli", "annotate preference data with LLMs (CDR, RLAIF)"),
    "compare": ("fastpref.compare", "side-by-side fused vs naive log-probs: time, peak memory, max error"),
    "demo": ("fastpref.demo", "DPO on SmolLM2-135M with fused vs naive log-probs, side by side"),
    "train": ("fastpref.train.cli", "preference optimisation of a causal LM (DPO family, KTO, ULMA ...)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="fastpref", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv[:1])
    # one error style (fastpref.errors): a user mistake is one line and exit 2; --debug keeps tracebacks
    from fastpref.errors import CommandParser, InputError, UsageError, missing_extra

    debug = "--debug" in argv[1:]
    argv = argv[:1] + [a for a in argv[1:] if a != "--debug"]
    try:
        module = importlib.import_module(COMMANDS[args.command][0])
        cmd_parser = CommandParser(prog=f"fastpref {args.command}", description=module.__doc__)
        module.add_arguments(cmd_parser)
        return int(module.run(cmd_parser.parse_args(argv[1:])) or 0)
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None or debug:
            raise
        print(f"fastpref {args.command}: {extra}", file=sys.stderr)
        return 2
    except (UsageError, InputError) as exc:
        if debug:
            raise
        print(f"fastpref {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
