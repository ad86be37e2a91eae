#!/usr/bin/env python
"""Thin wrapper: see `python scripts/sweep.py --help` or wegeft_vision/protocols/sweep.py."""
import sys

from wegeft_vision.protocols.sweep import main

if __name__ == "__main__":
    sys.exit(main())
