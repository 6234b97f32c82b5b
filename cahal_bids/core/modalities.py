"""The structural contrasts cahal-bids knows, by BIDS suffix (one definition for the package).

Which of them the enhancer can restore is a property of the shipped zoos
(:data:`cahal_bids.engine.zoo.SHIPPED_ZOOS`); training ground truth may be any of them.
"""

from __future__ import annotations

__all__ = ['MODALITIES']

MODALITIES: tuple[str, ...] = ('T1w', 'FLAIR', 'T2w')
"""BIDS suffixes of the structural contrasts that can be prepared, evaluated and routed."""
