"""The ``prefixgate`` command line: one entry point, one subcommand per job.

Each subcommand lives with the package it runs and exposes ``add_arguments(parser)`` and
``run(args) -> int``; they are imported lazily so that ``prefixgate gateway`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cache.api.flags import FlagError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "serve": ("gateway.serve", "the main job: start engine workers and the gateway in front of them"),
    "gateway": ("gateway.run", "run the gateway in front of workers that already run (--worker URL ...)"),
    "bench": ("loadgen.cli", "load-generate against any OpenAI-compatible endpoint and report metrics"),
    "engine": ("engine.server.cli", "run one embedded engine worker (OpenAI + SGLang-compatible HTTP API)"),
}


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _add_log_level(parser: argparse.ArgumentParser, default: str | None) -> None:
    # Accepted before or after the subcommand; the subcommand's copy only overrides when given.
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=default if default is not None else argparse.SUPPRESS,
        help="log verbosity (default: info)",
    )


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser with only the chosen subcommand's arguments (the others are not imported)."""
    parser = argparse.ArgumentParser(
        prog="prefixgate", description="prefix-caching LLM gateway and engine", allow_abbrev=False
    )
    _add_log_level(parser, "info")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            allow_abbrev=False,  # `--admin-key X` must not pass for `--admin-key-env X`
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # every option shows its default
        )
        _add_log_level(p, None)
        if name == chosen:  # only the chosen one is imported: its arguments are all we parse
            importlib.import_module(module).add_arguments(p)
    return parser


log = logging.getLogger("prefixgate")  # not __name__: that is __main__ under `python -m`


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 for a flag that cannot work (argparse's own, or a ``FlagError`` from the
    subcommand's checks, made before anything slow): one line that names the flag and the fix."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)
    except FlagError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, at any point: whatever started is stopped on the way out
        print("prefixgate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
