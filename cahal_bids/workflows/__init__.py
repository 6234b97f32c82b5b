"""Deprecated: the Nipype workflow factories moved to :mod:`cahal_bids.app.workflows`."""

from cahal_bids._deprecated import reexport

reexport(__name__, 'cahal_bids.app.workflows', globals())
