"""Acquisition geometries for training: the parametric generator G(V, A) and its samplers.

A simulated acquisition is a triplet of voxel sizes in millimetres. Following the
empirical analysis behind CAHAL, two axes always share one size (the in-plane
pixel size) and the third one (the slice axis, called the *odd* axis here) is at
least as coarse. Such a triplet is fixed by two numbers, the voxel volume
``V = rx * ry * rz`` in mm^3 and the anisotropy ``A = r_min / r_max``:

* in-plane size ``a = (V * A) ** (1 / 3)``,
* slice size ``b = a / A``,

so ``a * a * b == V`` and ``a / b == A``. Every axis must be at least 1 mm (the
target grid), which rules out ``V * A < 1``.

Samplers take a :class:`numpy.random.Generator` and return plain tuples, so they
can be replayed from a seed and used by
:class:`cahal_bids.physics.degradation.RandomDegrade`.

>>> triplet_from_volume_anisotropy(5.0, 0.2)
(1.0, 1.0, 5.0)
>>> triplet_from_volume_anisotropy(8.0, 1.0)
(2.0, 2.0, 2.0)
>>> import numpy as np
>>> from cahal_bids.core.routing import route
>>> route(sample_in_cell('V5A1', np.random.default_rng(0))).cell
'V5A1'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cahal_bids.core.routing import CELLS, VOLUME_BINS, cell_bounds, route

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    'CLINICAL_PATTERN_MIX',
    'DEFAULT_MAX_VOLUME',
    'PATTERN_MIXES',
    'PATTERN_ODD_AXIS',
    'RESEARCH_PATTERN_MIX',
    'CellSampler',
    'ClinicalMixSampler',
    'Triplet',
    'sample_clinical_mix',
    'sample_in_cell',
    'triplet_from_volume_anisotropy',
]

Triplet = tuple[float, float, float]
"""Voxel sizes ``(rx, ry, rz)`` in millimetres."""

DEFAULT_MAX_VOLUME = 10.5
"""Upper voxel volume (mm^3) for the open-ended V7 bin, as in the paper's evaluation."""

RESEARCH_PATTERN_MIX: dict[str, float] = {
    'isotropic': 58.6,
    'axial': 24.1,
    'sagittal': 15.2,
    'coronal': 2.0,
}
"""Resolution patterns of the research database (volBrain), in percent (Table 2).

Heterogeneous geometries (all three sizes different, under 0.1 %) are left out
because the generator always keeps two equal axes; samplers renormalise.
"""

CLINICAL_PATTERN_MIX: dict[str, float] = {
    'isotropic': 1.5,
    'axial': 98.5,
}
"""Resolution patterns of the clinical database (Valencia Biobank), in percent (Table 2)."""

PATTERN_MIXES: dict[str, dict[str, float]] = {
    'research': RESEARCH_PATTERN_MIX,
    'clinical': CLINICAL_PATTERN_MIX,
}
"""Pattern mixes by database name, as accepted by :func:`sample_clinical_mix`."""

PATTERN_ODD_AXIS: dict[str, int] = {
    'axial': 2,
    'sagittal': 0,
    'coronal': 1,
}
"""Index of the slice (odd) axis of each anisotropic pattern: axial is X = Y != Z, etc."""

_BATCH = 256
"""Candidates drawn per rejection round."""

_MAX_ROUNDS = 64
"""Rejection rounds before giving up (the sparsest cell, V3A1, keeps about 3 %)."""


def _check_odd_axis(odd_axis: int) -> int:
    if isinstance(odd_axis, bool) or odd_axis not in (0, 1, 2):
        raise ValueError(f'odd_axis must be 0, 1 or 2, got {odd_axis!r}')
    return int(odd_axis)


def _check_max_volume(max_volume: float) -> float:
    low = VOLUME_BINS[-1][0]
    if not (math.isfinite(max_volume) and max_volume > low):
        raise ValueError(f'max_volume must be finite and > {low} mm^3, got {max_volume!r}')
    return float(max_volume)


def triplet_from_volume_anisotropy(
    volume: float,
    anisotropy: float,
    odd_axis: int = 2,
) -> Triplet:
    """The generator G(V, A): voxel sizes with volume ``volume`` and anisotropy ``anisotropy``.

    Two axes get the in-plane size ``a = (V * A) ** (1 / 3)`` and the axis
    ``odd_axis`` gets the slice size ``b = a / A >= a``.

    Args:
        volume: voxel volume ``V`` in mm^3, at least 1.
        anisotropy: ``A = r_min / r_max`` in (0, 1].
        odd_axis: index (0, 1 or 2) of the slice axis.

    Returns:
        The triplet ``(rx, ry, rz)`` in mm.

    Raises:
        ValueError: an argument is out of range, or the pair is infeasible
            (``V * A < 1``: the in-plane size would be finer than 1 mm).

    >>> triplet_from_volume_anisotropy(4.0, 0.25, odd_axis=0)
    (4.0, 1.0, 1.0)
    >>> triplet_from_volume_anisotropy(2.0, 0.25)
    Traceback (most recent call last):
    ...
    ValueError: infeasible (V, A) = (2.0, 0.25): in-plane size 0.794 mm is below 1 mm
    """
    odd_axis = _check_odd_axis(odd_axis)
    volume = float(volume)
    anisotropy = float(anisotropy)
    if not (math.isfinite(volume) and volume >= 1.0):
        raise ValueError(f'voxel volume must be finite and >= 1 mm^3, got {volume!r}')
    if not (math.isfinite(anisotropy) and 0.0 < anisotropy <= 1.0):
        raise ValueError(f'anisotropy must be in (0, 1], got {anisotropy!r}')
    product = volume * anisotropy
    in_plane = product ** (1.0 / 3.0)
    if product < 1.0:
        raise ValueError(
            f'infeasible (V, A) = ({volume!r}, {anisotropy!r}): '
            f'in-plane size {in_plane:.3f} mm is below 1 mm'
        )
    sizes = [in_plane, in_plane, in_plane]
    sizes[odd_axis] = in_plane / anisotropy
    return (sizes[0], sizes[1], sizes[2])


def sample_in_cell(
    cell: str,
    rng: np.random.Generator,
    *,
    max_volume: float = DEFAULT_MAX_VOLUME,
    odd_axis: int | None = None,
) -> Triplet:
    """Draw a triplet uniformly over the feasible part of a routing cell.

    ``V`` is uniform in the cell's volume bin (the open-ended V7 is capped at
    ``max_volume``) and ``A`` uniform in its anisotropy bin; pairs with
    ``V * A < 1`` (in-plane size under 1 mm) are rejected, and so are the rare
    pairs whose triplet :func:`cahal_bids.core.routing.route` would put in another
    cell because of floating-point rounding at a bin edge (or that it would skip
    as already 1 mm). The accepted triplet therefore always routes to ``cell``.

    Args:
        cell: one of :data:`cahal_bids.core.routing.CELLS`, e.g. ``'V5A1'``.
        rng: the random source.
        max_volume: cap (mm^3) of the V7 bin; must exceed its lower edge, 6.5.
        odd_axis: index of the slice axis; ``None`` draws it uniformly from
            0, 1, 2 (random orientation permutation).

    Raises:
        ValueError: unknown cell, bad ``max_volume`` or ``odd_axis``.
        RuntimeError: no acceptable draw after a bounded number of rounds
            (does not happen for the 18 cells with the default cap).

    >>> import numpy as np
    >>> rng = np.random.default_rng(7)
    >>> sizes = sample_in_cell('V3A1', rng, odd_axis=2)
    >>> sizes[0] == sizes[1] < sizes[2]
    True
    """
    (v_low, v_high), (a_low, a_high) = cell_bounds(cell)
    max_volume = _check_max_volume(max_volume)
    if math.isinf(v_high):
        v_high = max_volume
    axis = int(rng.integers(3)) if odd_axis is None else _check_odd_axis(odd_axis)
    for _ in range(_MAX_ROUNDS):
        volumes = rng.uniform(v_low, v_high, size=_BATCH)  # [v_low, v_high)
        anisotropies = a_high - rng.uniform(0.0, a_high - a_low, size=_BATCH)  # (a_low, a_high]
        feasible = (volumes * anisotropies >= 1.0) & (anisotropies > a_low)
        for index in feasible.nonzero()[0]:
            sizes = triplet_from_volume_anisotropy(volumes[index], anisotropies[index], axis)
            if route(sizes).cell == cell:
                return sizes
    raise RuntimeError(
        f'no feasible triplet found in cell {cell!r} after {_MAX_ROUNDS * _BATCH} draws '
        f'(max_volume={max_volume!r})'
    )


def _normalised_mix(database: str) -> tuple[list[str], list[float]]:
    if database not in PATTERN_MIXES:
        raise ValueError(
            f'unknown database {database!r}; expected one of {", ".join(PATTERN_MIXES)}'
        )
    mix = PATTERN_MIXES[database]
    total = sum(mix.values())
    return list(mix), [share / total for share in mix.values()]


def sample_clinical_mix(
    rng: np.random.Generator,
    *,
    database: str = 'clinical',
    max_volume: float = DEFAULT_MAX_VOLUME,
) -> tuple[Triplet, str]:
    """Draw a triplet from the resolution-pattern mix of a database.

    The pattern (isotropic, axial, sagittal, coronal) follows the proportions of
    :data:`PATTERN_MIXES` (``'research'``: volBrain, ``'clinical'``: Valencia
    Biobank), renormalised without the heterogeneous pattern. Within a pattern:

    * isotropic: ``V`` uniform in ``[1, max_volume)``, triplet ``(s, s, s)`` with
      ``s = V ** (1 / 3)``;
    * anisotropic: a cell drawn uniformly among all 18 cells of
      :data:`cahal_bids.core.routing.CELLS` (A1, A2 and also A3, which holds mildly
      anisotropic protocols), then :func:`sample_in_cell` with the pattern's slice
      axis (:data:`PATTERN_ODD_AXIS`).

    The paper reports pattern proportions only, not how volume and anisotropy are
    spread within a pattern: drawing ``V`` and ``A`` uniformly over the routing
    grid is an assumption of this implementation.

    Returns:
        ``(triplet, pattern)``, e.g. ``((1.2, 1.2, 4.1), 'axial')``.

    Raises:
        ValueError: unknown database or bad ``max_volume``.

    >>> import numpy as np
    >>> sizes, pattern = sample_clinical_mix(np.random.default_rng(3), database='research')
    >>> pattern in RESEARCH_PATTERN_MIX
    True
    """
    patterns, probabilities = _normalised_mix(database)
    max_volume = _check_max_volume(max_volume)
    pattern = patterns[int(rng.choice(len(patterns), p=probabilities))]
    if pattern == 'isotropic':
        side = float(rng.uniform(1.0, max_volume)) ** (1.0 / 3.0)
        return (side, side, side), pattern
    cell = CELLS[int(rng.integers(len(CELLS)))]
    sizes = sample_in_cell(cell, rng, max_volume=max_volume, odd_axis=PATTERN_ODD_AXIS[pattern])
    return sizes, pattern


@dataclass(frozen=True)
class CellSampler:
    """Callable ``rng -> triplet`` drawing from one routing cell (see :func:`sample_in_cell`).

    >>> import numpy as np
    >>> sampler = CellSampler('V2A3')
    >>> sampler(np.random.default_rng(0)) == sampler(np.random.default_rng(0))
    True
    """

    cell: str
    max_volume: float = DEFAULT_MAX_VOLUME
    odd_axis: int | None = None

    def __post_init__(self) -> None:
        cell_bounds(self.cell)
        _check_max_volume(self.max_volume)
        if self.odd_axis is not None:
            _check_odd_axis(self.odd_axis)

    def __call__(self, rng: np.random.Generator) -> Triplet:
        return sample_in_cell(self.cell, rng, max_volume=self.max_volume, odd_axis=self.odd_axis)


@dataclass(frozen=True)
class ClinicalMixSampler:
    """Callable ``rng -> triplet`` drawing from a database's pattern mix.

    See :func:`sample_clinical_mix`; the pattern name is dropped.

    >>> import numpy as np
    >>> len(ClinicalMixSampler('research')(np.random.default_rng(0)))
    3
    """

    database: str = 'clinical'
    max_volume: float = DEFAULT_MAX_VOLUME

    def __post_init__(self) -> None:
        _normalised_mix(self.database)
        _check_max_volume(self.max_volume)

    def __call__(self, rng: np.random.Generator) -> Triplet:
        sizes, _ = sample_clinical_mix(rng, database=self.database, max_volume=self.max_volume)
        return sizes
