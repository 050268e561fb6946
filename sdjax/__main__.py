"""The `sdjax` command (and `python -m sdjax`): Ctrl-C handling first, then the command line in `sdjax.cli`.

Kept apart from `sdjax.cli` so that the signal handling is in place before jax and the models are imported:
a Ctrl-C at any moment exits 130 with one line (`sdjax.process.exit_on_interrupt`)."""

from __future__ import annotations

import sys


def main() -> int:
    from sdjax import process

    process.exit_on_interrupt()
    from sdjax import cli

    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
