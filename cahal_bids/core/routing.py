"""Deterministic bivariate gating: which expert restores an image, from its header alone.

The grid crosses seven voxel-volume bins with three anisotropy bins:

* volume ``V = rx * ry * rz`` (mm^3): V1 [1, 1.5), V2 [1.5, 2.5), V3 [2.5, 3.5),
  V4 [3.5, 4.5), V5 [4.5, 5.5), V6 [5.5, 6.5), V7 [6.5, inf);
* anisotropy ``A = r_min / r_max``: A1 (0, 0.33], A2 (0.33, 0.66], A3 (0.66, 1].

V1A1, V1A2 and V2A1 cannot occur once every axis is at least 1 mm, so 18 cells
remain. Routing clips voxel sizes to ``max(r, 1 mm)`` first: detail finer than the
1 mm target is averaged into it anyway, and the clipping guarantees a feasible
cell. An image whose voxel sizes are all at most ``1 mm + SKIP_TOLERANCE_MM`` is
not enhanced at all.

>>> route((1.0, 1.0, 5.0)).cell
'V5A1'
>>> route((1.7, 1.7, 1.7)).cell
'V5A3'
>>> route((1.0, 1.0, 3.0)).cell
'V3A2'
>>> route((0.5, 0.5, 5.0)).cell
'V5A1'
>>> route((0.9, 0.9, 0.9)).skip
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from cahal_bids.core.errors import RoutingError

__all__ = [
    'ANISOTROPY_BINS',
    'CELLS',
    'INFEASIBLE_CELLS',
    'SKIP_TOLERANCE_MM',
    'TARGET_SPACING_MM',
    'VOLUME_BINS',
    'Route',
    'anisotropy_bin',
    'cell_bounds',
    'cell_name',
    'route',
    'volume_bin',
]

TARGET_SPACING_MM = 1.0
"""The isotropic spacing every enhanced image is restored to."""

SKIP_TOLERANCE_MM = 1e-3
"""Voxel sizes up to ``1.0 + SKIP_TOLERANCE_MM`` count as 1 mm (header rounding)."""

VOLUME_BINS: tuple[tuple[float, float], ...] = (
    (1.0, 1.5),
    (1.5, 2.5),
    (2.5, 3.5),
    (3.5, 4.5),
    (4.5, 5.5),
    (5.5, 6.5),
    (6.5, math.inf),
)
"""Half-open ``[low, high)`` voxel-volume bins in mm^3, V1 to V7."""

ANISOTROPY_BINS: tuple[tuple[float, float], ...] = (
    (0.0, 0.33),
    (0.33, 0.66),
    (0.66, 1.0),
)
"""Half-open ``(low, high]`` anisotropy bins, A1 (strongest) to A3 (near isotropic)."""

INFEASIBLE_CELLS = frozenset({'V1A1', 'V1A2', 'V2A1'})


def cell_name(volume_index: int, anisotropy_index: int) -> str:
    """Name of the cell for 1-based bin indices, e.g. ``cell_name(5, 1) == 'V5A1'``."""
    return f'V{volume_index}A{anisotropy_index}'


CELLS: tuple[str, ...] = tuple(
    cell_name(v, a)
    for v in range(1, len(VOLUME_BINS) + 1)
    for a in range(len(ANISOTROPY_BINS), 0, -1)
    if cell_name(v, a) not in INFEASIBLE_CELLS
)
"""The 18 feasible cells, by increasing volume then decreasing anisotropy bin."""


def volume_bin(volume: float) -> int:
    """1-based volume bin of ``volume`` (mm^3); values below 1 mm^3 raise."""
    if not (math.isfinite(volume) and volume >= VOLUME_BINS[0][0]):
        raise RoutingError(f'voxel volume {volume!r} mm^3 is outside the routing grid')
    for index, (low, high) in enumerate(VOLUME_BINS, start=1):
        if low <= volume < high:
            return index
    raise RoutingError(f'voxel volume {volume!r} mm^3 is outside the routing grid')


def anisotropy_bin(anisotropy: float) -> int:
    """1-based anisotropy bin of ``anisotropy`` in (0, 1]."""
    if not (math.isfinite(anisotropy) and 0.0 < anisotropy <= 1.0):
        raise RoutingError(f'anisotropy {anisotropy!r} is outside (0, 1]')
    for index, (low, high) in enumerate(ANISOTROPY_BINS, start=1):
        if low < anisotropy <= high:
            return index
    raise RoutingError(f'anisotropy {anisotropy!r} is outside (0, 1]')  # pragma: no cover


def cell_bounds(cell: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((v_low, v_high), (a_low, a_high))`` of a feasible cell name."""
    if cell not in CELLS:
        raise ValueError(f'unknown cell {cell!r}; feasible cells are {", ".join(CELLS)}')
    v_index, a_index = int(cell[1]), int(cell[3])
    return VOLUME_BINS[v_index - 1], ANISOTROPY_BINS[a_index - 1]


@dataclass(frozen=True)
class Route:
    """Where one image goes: the gate's inputs and its decision."""

    voxel_sizes: tuple[float, float, float]
    """Header voxel sizes in mm, as given."""
    routed_sizes: tuple[float, float, float]
    """Voxel sizes clipped to at least 1 mm (what V and A are computed from)."""
    volume: float
    """V = product of the routed sizes, in mm^3."""
    anisotropy: float
    """A = smallest / largest routed size."""
    skip: bool
    """True when the image is already at 1 mm or finer along every axis."""
    cell: str | None
    """Expert cell (e.g. ``'V5A1'``), or None when skipped."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def route(voxel_sizes: Sequence[float]) -> Route:
    """Route an image from its three voxel sizes (mm)."""
    sizes = tuple(float(r) for r in voxel_sizes)
    if len(sizes) != 3:
        raise RoutingError(f'expected 3 voxel sizes, got {len(sizes)}: {sizes}')
    if not all(math.isfinite(r) and r > 0 for r in sizes):
        raise RoutingError(f'voxel sizes must be finite and > 0, got {sizes}')
    routed = tuple(max(r, TARGET_SPACING_MM) for r in sizes)
    volume = routed[0] * routed[1] * routed[2]
    anisotropy = min(routed) / max(routed)
    skip = max(sizes) <= TARGET_SPACING_MM + SKIP_TOLERANCE_MM
    cell = None if skip else cell_name(volume_bin(volume), anisotropy_bin(anisotropy))
    return Route(
        voxel_sizes=sizes,  # type: ignore[arg-type]
        routed_sizes=routed,  # type: ignore[arg-type]
        volume=volume,
        anisotropy=anisotropy,
        skip=skip,
        cell=cell,
    )
