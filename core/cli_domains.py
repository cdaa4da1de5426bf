"""CLI commands: domains (registered by core.cli.build_parser)."""
from __future__ import annotations


def add_domains_commands(sub) -> None:
    """Registers this module's subcommands on ``sub`` (argparse subparsers)."""
