"""Thin Nipype interfaces over cahal-bids library functions (one module per concern)."""
