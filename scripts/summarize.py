#!/usr/bin/env python
"""Thin wrapper: see `python scripts/summarize.py --help` or wegeft_vision/protocols/report.py."""
import sys

from wegeft_vision.protocols.report import main

if __name__ == "__main__":
    sys.exit(main())
