"""CLI commands: measured (registered by core.cli.build_parser)."""
from __future__ import annotations


def add_measured_commands(sub) -> None:
    """Registers this module's subcommands on ``sub`` (argparse subparsers)."""
