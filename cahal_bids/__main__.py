"""``python -m cahal_bids``: the BIDS-App, same code as ``cahal-bids`` and ``run.py``."""

from __future__ import annotations

import sys

from cahal_bids.cli.run import main

if __name__ == '__main__':
    sys.exit(main())
