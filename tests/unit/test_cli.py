"""The ``fl-sidecar`` command line: who registers which subcommand, and the shared formatting."""

from __future__ import annotations

import argparse
from typing import Any, Set

import pytest

from fl_sidecar import cli, demo, tools
from fl_sidecar.formatting import human_bytes


def _commands(parser: argparse.ArgumentParser) -> Set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return set(actions[0].choices)


def _registered_by(module: Any) -> Set[str]:
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    return _commands(parser)


def test_every_subcommand_is_wired() -> None:
    assert _commands(cli.build_parser()) == {
        "serve",
        "devserver",
        "download",
        "upload",
        "pack",
        "unpack",
        "info",
        "events",
        "demo",
    }


def test_demo_registers_its_own_command() -> None:
    assert _registered_by(demo) == {"demo"}
    assert "demo" not in _registered_by(tools)
    args = cli.build_parser().parse_args(["demo", "--clients", "3", "--rounds", "1"])
    assert (args.clients, args.rounds, args.epochs, args.keep) == (3, 1, 2, False)
    assert callable(args.func)


def test_a_command_without_its_arguments_is_bad_usage() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["demo", "--clients", "many"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (2 * 1024**5, "2048.0 TiB"),
    ],
)
def test_byte_counts_in_binary_units(count: float, text: str) -> None:
    assert human_bytes(count) == text
