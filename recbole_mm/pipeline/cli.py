"""Sub-commands of ``recbole-mm`` for the data pipeline.

Each module registers its own sub-parsers with ``set_defaults(func=...)``; ``func(args)``
returns the exit status.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register preprocess, merge, extract-text, extract-image, download-images and prepare."""
    from recbole_mm.pipeline import images, merge, prepare, preprocess, text

    preprocess.register(sub)
    merge.register(sub)
    text.register(sub)
    images.register(sub)
    prepare.register(sub)


def run_command(args: argparse.Namespace) -> int:
    from recbole_mm.data.readers import DataValidationError
    from recbole_mm.pipeline.common import PipelineError

    func = getattr(args, "func", None)
    if func is None:
        raise SystemExit(f"recbole-mm: unknown command {args.command!r}")
    try:
        return int(func(args) or 0)
    except (PipelineError, DataValidationError, FileNotFoundError) as e:
        print(f"recbole-mm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recbole-mm {args.command}: interrupted (outputs are left as they were)", file=sys.stderr)
        return 130
