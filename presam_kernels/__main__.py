"""``python -m presam_kernels COMMAND``: the package's command line.

Commands:
  compare   the label-noise comparison of the optimizers (see ``--help``)
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from .compare import cli as compare_cli

    parser = argparse.ArgumentParser(
        prog="python -m presam_kernels",
        description="Command line of presam-kernels, sharpness-aware optimizers for PyTorch.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    compare = commands.add_parser(
        "compare",
        help="compare optimizers on data with noisy labels (make demo)",
        description=compare_cli.DESCRIPTION,
    )
    compare_cli.add_arguments(compare)
    args = parser.parse_args(argv)
    return compare_cli.run_command(args, compare)


if __name__ == "__main__":
    sys.exit(main())
