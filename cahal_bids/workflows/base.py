"""Deprecated: moved to :mod:`cahal_bids.app.workflows.base`."""

from cahal_bids._deprecated import reexport

reexport(__name__, 'cahal_bids.app.workflows.base', globals())
