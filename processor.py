#!/usr/bin/env python3
"""telemetry-processor: `python processor.py [run|migrate|replay|dead-letters|simulate]`."""

import sys

from processor.cli import main

if __name__ == "__main__":
    sys.exit(main())
