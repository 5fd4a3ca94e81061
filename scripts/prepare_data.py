#!/usr/bin/env python3
"""The usage guide's `python scripts/prepare_data.py --input ... --output ...`: the same as `llm-prepare-data`."""

import sys

from llm_training.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
