#!/usr/bin/env python
"""sdjax entry point: `python train_flax.py --help`."""

import sys

from sdjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
