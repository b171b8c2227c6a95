#!/usr/bin/env python
"""`python run_finetune.py -m MODEL -d DATASET ...` (same as `recbole-mm finetune ...`; see --help)."""
import sys

from recbole_mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
