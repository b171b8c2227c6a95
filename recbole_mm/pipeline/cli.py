"""Sub-commands of ``recbole-mm`` for the data pipeline (filled in by the data-pipeline work)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the pipeline sub-commands on the top-level parser."""


def run_command(args: argparse.Namespace) -> int:
    raise SystemExit(f"recbole-mm: unknown command {args.command!r}")
