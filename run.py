#!/usr/bin/env python
"""BIDS-App entry point: ``python run.py BIDS_DIR OUTPUT_DIR participant``."""

import sys

from cahal_bids.cli.run import main

sys.exit(main())
