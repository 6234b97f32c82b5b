"""Deprecated: moved to :mod:`cahal_bids.app.workflows.enhance`."""

from cahal_bids._deprecated import reexport

reexport(__name__, 'cahal_bids.app.workflows.enhance', globals())
