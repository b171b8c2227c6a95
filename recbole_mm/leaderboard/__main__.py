"""``python -m recbole_mm.leaderboard _cell <spec>``: one cell, in its own process (see
``execute._launch``); any other arguments run ``recbole-mm leaderboard ...``."""

import sys

from recbole_mm.leaderboard.execute import run_cell

if len(sys.argv) == 3 and sys.argv[1] == "_cell":
    sys.exit(run_cell(sys.argv[2]))
from recbole_mm.cli import main as cli_main  # noqa: E402 - an entry point, as run_finetune.py

sys.exit(cli_main(["leaderboard", *sys.argv[1:]]))
