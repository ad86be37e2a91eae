#!/usr/bin/env python
"""Thin wrapper: see `python scripts/run_protocol.py --help` or wegeft_vision/protocols/runner.py."""
import sys

from wegeft_vision.protocols.runner import main

if __name__ == "__main__":
    sys.exit(main())
