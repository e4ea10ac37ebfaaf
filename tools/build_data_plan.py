#!/usr/bin/env python
"""Kept for old scripts: use `phoenix build-plan` (this file runs exactly that; needs phoenix installed,
e.g. `pip install -e .`)."""

import sys

from phoenix.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-plan", *sys.argv[1:]]))
