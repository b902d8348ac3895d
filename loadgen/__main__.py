"""``python -m loadgen``: the same command as ``prefixgate bench``."""

from __future__ import annotations

import argparse
import logging
import sys

from loadgen import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen", description=cli.DESCRIPTION)
    parser.add_argument("--log-level", default="INFO")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
