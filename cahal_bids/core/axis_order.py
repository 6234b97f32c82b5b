"""The array axis order an expert sees: as acquired, or with the thickest axis last.

A zoo manifest may declare ``"axis_order": "thickest-last"``. Its experts were trained
on pairs whose axes were reordered so that the axis of the largest low-resolution voxel
size comes last (the other two keep their order), and inference reorders the 1 mm input
the same way from the header's voxel sizes, then puts the output back. The anatomy along
the thick axis still varies (axial, coronal or sagittal slices, random in training), but
the through-plane direction a small network must learn to restore is always the same
array axis. Zoos without the entry (``"as-acquired"``) see the volume in its own axis
order, every orientation having been drawn in training.

>>> thickest_last((1.0, 1.0, 4.0)), thickest_last((5.0, 1.0, 1.0))
((0, 1, 2), (1, 2, 0))
>>> inverse((1, 2, 0))
(2, 0, 1)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ['AXIS_ORDERS', 'inverse', 'thickest_last', 'validated_axis_order']

AXIS_ORDERS = ('as-acquired', 'thickest-last')

_TIE_DECIMALS = 3
"""Voxel sizes equal to a micrometre count as equal (headers carry float noise)."""


def thickest_last(voxel_sizes: Sequence[float]) -> tuple[int, int, int]:
    """Axis permutation putting the largest voxel size last; the others keep their order.

    Among equally thick axes the last one is taken, so an order that already ends with a
    thickest axis is left unchanged.
    """
    sizes = [round(float(size), _TIE_DECIMALS) for size in voxel_sizes]
    if len(sizes) != 3:
        raise ValueError(f'expected three voxel sizes, got {list(voxel_sizes)}')
    thickest = max(range(3), key=lambda axis: (sizes[axis], axis))
    others = [axis for axis in range(3) if axis != thickest]
    return (others[0], others[1], thickest)


def inverse(permutation: Sequence[int]) -> tuple[int, int, int]:
    """The permutation that undoes ``permutation``."""
    undo = [0, 0, 0]
    for position, axis in enumerate(permutation):
        undo[axis] = position
    return (undo[0], undo[1], undo[2])


def validated_axis_order(entry: object, *, where: str) -> str:
    """Check a manifest's ``axis_order``; ``None`` means ``'as-acquired'``."""
    if entry is None:
        return 'as-acquired'
    if entry not in AXIS_ORDERS:
        raise ValueError(
            f'{where}: "axis_order" must be one of {list(AXIS_ORDERS)}, got {entry!r}'
        )
    return str(entry)
