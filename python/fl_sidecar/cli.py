"""The ``fl-sidecar`` command line: one entry point, one subcommand per job.

Each subcommand lives in the module that owns its responsibility and exposes
``register(subparsers)``; this module only wires them together, importing each
lazily so that ``fl-sidecar pack`` does not pay for gRPC or torch imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence

# The modules that add subcommands, in the order of the help; each module's
# ``register(subparsers)`` adds its own parsers with ``func`` set.
_COMMAND_MODULES: Sequence[str] = (
    "fl_sidecar.sidecar.process",  # serve
    "fl_sidecar.devserver.cli",  # devserver
    "fl_sidecar.tools",  # download, upload, pack, unpack, info, events
    "fl_sidecar.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="fl-sidecar",
        description="Move federated-learning models between trainers and the FL server.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.startswith("fl_sidecar"):
                continue  # that part is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result = func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
