"""Deprecated: moved to :mod:`cahal_bids.engine.inference`."""

from cahal_bids._deprecated import reexport

reexport(__name__, 'cahal_bids.engine.inference', globals())
