#!/usr/bin/env python
"""`python run_pretrain.py -m MODEL -d DATASET ...` (same as `recbole-mm pretrain ...`; see --help)."""
import sys

from recbole_mm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
