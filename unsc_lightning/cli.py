"""Command line entry point `unsc-lightning`."""

from __future__ import annotations

import sys

COMMANDS = ("demo",)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``unsc-lightning <command> ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from unsc_lightning.demo import main as demo_main

        return demo_main(argv[1:])
    sys.stderr.write(f"usage: unsc-lightning {{{','.join(COMMANDS)}}} [options]\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
