"""Physics-based degradation of a 1 mm ground truth into a simulated low-resolution scan.

The model has two separable steps, each built from the 1D operators of
:mod:`cahal_bids.core.resampling`:

1. *Acquisition*: every low-resolution voxel records the mean signal over its
   extent (a box point-spread function). The low-resolution grid has spacing
   ``resolution`` (mm, per axis, non-integer allowed) and its voxel 0 starts
   ``offset`` mm from the corner of the 1 mm field of view (``offset`` in
   ``(-r, 0]``, so the grid phase can vary); it has the fewest voxels that cover
   the field of view. Overlaps are fractional and exact.
2. *Initialisation*: trilinear interpolation back onto the original 1 mm grid,
   which is what the restoration network receives.

Following TorchIO, the maths lives in the pure function :func:`degrade`, the
deterministic :class:`Degrade` applies recorded :class:`DegradationParameters`,
and :class:`RandomDegrade` samples those parameters, so every training pair can
be replayed.

>>> import torch
>>> volume = torch.ones(1, 1, 12, 12, 12)
>>> degraded, low = degrade(volume, (1.0, 1.0, 3.0), return_low_resolution=True)
>>> tuple(degraded.shape), tuple(low.shape)
((1, 1, 12, 12, 12), (1, 1, 12, 12, 4))
>>> bool(torch.allclose(degraded, volume))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from cahal_bids.core.resampling import apply_separable, box_weights, linear_weights
from cahal_bids.core.routing import route

if TYPE_CHECKING:
    import torch

__all__ = [
    'DegradationParameters',
    'Degrade',
    'RandomDegrade',
    'Sampler',
    'degrade',
    'low_resolution_shape',
]


def _check_geometry(
    resolution: Sequence[float], offset: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate and normalise ``resolution`` and ``offset`` to tuples of three floats."""
    if len(resolution) != 3:
        raise ValueError(f'resolution must have 3 values (mm), got {tuple(resolution)!r}')
    if len(offset) != 3:
        raise ValueError(f'offset must have 3 values (mm), got {tuple(offset)!r}')
    sizes = tuple(float(r) for r in resolution)
    shifts = tuple(float(o) for o in offset)
    for r in sizes:
        if not (math.isfinite(r) and r >= 1.0):
            raise ValueError(f'resolution values must be finite and >= 1 mm, got {sizes!r}')
    for r, o in zip(sizes, shifts, strict=True):
        if not (math.isfinite(o) and -r < o <= 0.0):
            raise ValueError(
                f'offset values must lie in (-resolution, 0] mm, got offset {shifts!r} '
                f'for resolution {sizes!r}'
            )
    return sizes, shifts


def _low_resolution_size(n: int, resolution: float, offset: float) -> int:
    """Fewest voxels of ``resolution`` mm from ``offset`` that cover ``[0, n)`` mm.

    Coverage is decided with the very expression :func:`box_weights` uses for the
    upper edge of the last voxel, so ``n / r`` rounding (``27 / 2.7 > 10``) neither
    adds an empty voxel nor leaves a sliver of the field of view uncovered.
    """

    def covers(m: int) -> bool:
        return offset + (m - 1) * resolution + resolution >= n

    m = max(1, math.ceil((n - offset) / resolution))
    while m > 1 and covers(m - 1):
        m -= 1
    while not covers(m):
        m += 1
    return m


def _is_identity(resolution: float, offset: float) -> bool:
    return resolution == 1.0 and offset == 0.0


def low_resolution_shape(
    shape: Sequence[int],
    resolution: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[int, int, int]:
    """Size of the low-resolution grid covering a 1 mm grid of spatial ``shape``.

    Along each axis it is ``ceil((n - offset) / r)``: the fewest voxels of ``r`` mm,
    starting at ``offset``, that cover ``n`` mm.

    >>> low_resolution_shape((12, 12, 12), (1.0, 2.7, 3.0), (0.0, -0.5, 0.0))
    (12, 5, 4)
    """
    sizes, shifts = _check_geometry(resolution, offset)
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f'shape must have 3 positive sizes, got {tuple(shape)!r}')
    return tuple(  # type: ignore[return-value]
        int(n) if _is_identity(r, o) else _low_resolution_size(int(n), r, o)
        for n, r, o in zip(shape, sizes, shifts, strict=True)
    )


@overload
def degrade(
    volume: torch.Tensor,
    resolution: Sequence[float],
    offset: Sequence[float] = ...,
    *,
    return_low_resolution: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def degrade(
    volume: torch.Tensor,
    resolution: Sequence[float],
    offset: Sequence[float] = ...,
    *,
    return_low_resolution: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def degrade(
    volume: torch.Tensor,
    resolution: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    return_low_resolution: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Simulate acquiring a 1 mm volume at ``resolution`` and interpolating it back.

    Args:
        volume: floating-point tensor of shape ``(..., X, Y, Z)`` on a 1 mm grid;
            leading (batch, channel) axes share the same degradation. Any device.
        resolution: low-resolution voxel sizes in mm, each >= 1 (non-integer allowed).
        offset: start of low-resolution voxel 0 relative to the corner of the field
            of view, in mm, each in ``(-resolution[i], 0]``.
        return_low_resolution: also return the low-resolution tensor
            ``(..., *low_resolution_shape(...))``.

    Returns:
        The degraded tensor on the original grid (same shape, dtype and device), or
        ``(degraded, low_resolution)`` when ``return_low_resolution`` is true.

    Raises:
        ValueError: the volume is not floating point or has fewer than 3 axes, or
            ``resolution`` / ``offset`` are out of range.

    An axis with ``resolution == 1`` and ``offset == 0`` is left untouched.

    >>> import torch
    >>> x = torch.arange(4.0).reshape(1, 1, 4)
    >>> degrade(x, (1, 1, 2), return_low_resolution=True)[1].tolist()
    [[[0.5, 2.5]]]
    """
    import torch

    if not isinstance(volume, torch.Tensor):
        raise ValueError(f'volume must be a torch.Tensor, got {type(volume).__name__}')
    if volume.ndim < 3:
        raise ValueError(f'volume needs at least 3 axes (..., X, Y, Z), got {tuple(volume.shape)}')
    if not volume.dtype.is_floating_point:
        raise ValueError(f'volume must have a floating-point dtype, got {volume.dtype}')
    sizes, shifts = _check_geometry(resolution, offset)
    down: list[np.ndarray | None] = []
    up: list[np.ndarray | None] = []
    for n, r, o in zip(volume.shape[-3:], sizes, shifts, strict=True):
        if _is_identity(r, o):
            down.append(None)
            up.append(None)
            continue
        m = _low_resolution_size(n, r, o)
        down.append(box_weights(n_in=n, spacing_in=1.0, n_out=m, spacing_out=r, origin=o))
        up.append(linear_weights(n_in=m, spacing_in=r, n_out=n, spacing_out=1.0, origin=-o))
    if all(matrix is None for matrix in down):
        # nothing to resample: still hand back new tensors, never aliases of the input
        low = volume.clone()
        degraded = volume.clone()
    else:
        low = apply_separable(volume, down)
        degraded = apply_separable(low, up)
    if return_low_resolution:
        return degraded, low
    return degraded


def _triplet(values: Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(values, (str, bytes)) or len(values) != 3:
        raise ValueError(f'{name} must have 3 values, got {values!r}')
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class DegradationParameters:
    """Everything needed to replay one degradation.

    >>> p = DegradationParameters((1.0, 1.0, 4.5), (0.0, 0.0, -1.25), 'V5A1', 42)
    >>> DegradationParameters.from_dict(p.as_dict()) == p
    True
    """

    resolution: tuple[float, float, float]
    """Low-resolution voxel sizes in mm (each >= 1)."""
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Start of low-resolution voxel 0 relative to the field-of-view corner, mm, in (-r, 0]."""
    cell: str | None = None
    """Routing cell of ``resolution`` (informative), or None."""
    seed: int | None = None
    """Seed :meth:`RandomDegrade.sample_parameters` drew these parameters from, or None."""

    def __post_init__(self) -> None:
        resolution = _triplet(self.resolution, 'resolution')
        offset = _triplet(self.offset, 'offset')
        _check_geometry(resolution, offset)
        if self.cell is not None and not isinstance(self.cell, str):
            raise ValueError(f'cell must be a string or None, got {self.cell!r}')
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f'seed must be an integer or None, got {self.seed!r}')
        object.__setattr__(self, 'resolution', resolution)
        object.__setattr__(self, 'offset', offset)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (lists for the triplets)."""
        return {
            'resolution': list(self.resolution),
            'offset': list(self.offset),
            'cell': self.cell,
            'seed': self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DegradationParameters:
        """Inverse of :meth:`as_dict`; ``offset``, ``cell`` and ``seed`` are optional."""
        unknown = set(data) - {'resolution', 'offset', 'cell', 'seed'}
        if unknown:
            raise ValueError(f'unknown degradation parameter keys: {sorted(unknown)!r}')
        if 'resolution' not in data:
            raise ValueError(f'degradation parameters need a resolution, got {dict(data)!r}')
        return cls(
            resolution=data['resolution'],
            offset=data.get('offset', (0.0, 0.0, 0.0)),
            cell=data.get('cell'),
            seed=data.get('seed'),
        )


class Degrade:
    """Apply fixed :class:`DegradationParameters` to 1 mm volumes (see :func:`degrade`).

    >>> import torch
    >>> Degrade(DegradationParameters((2.0, 2.0, 2.0)))(torch.zeros(4, 4, 4)).shape
    torch.Size([4, 4, 4])
    """

    def __init__(self, parameters: DegradationParameters) -> None:
        if not isinstance(parameters, DegradationParameters):
            raise ValueError(
                f'parameters must be DegradationParameters, got {type(parameters).__name__}'
            )
        self.parameters = parameters

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        return degrade(volume, self.parameters.resolution, self.parameters.offset)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.parameters!r})'


def _random_offset(resolution: float, rng: np.random.Generator) -> float:
    """Uniform in ``(-resolution, 0]``, guarded against rounding onto ``-resolution``."""
    offset = -resolution * float(rng.uniform(0.0, 1.0)) + 0.0  # + 0.0 turns -0.0 into 0.0
    return max(offset, math.nextafter(-resolution, 0.0))


Sampler = Callable[[np.random.Generator], Sequence[float]]
"""Anything that draws a resolution triplet (mm) from a numpy Generator."""


class RandomDegrade:
    """Degrade with a freshly sampled acquisition geometry on every call.

    Each call draws a seed from ``rng``, then from that seed a resolution triplet
    (with ``sampler``, e.g. :class:`cahal_bids.physics.acquisition.CellSampler`) and, when
    ``random_offset`` is true, a grid offset uniform in ``(-r_i, 0]`` along every
    axis coarser than 1 mm. The recorded :class:`DegradationParameters` replay the
    pair with :class:`Degrade`, and :meth:`sample_parameters` re-draws them from
    their seed. One call degrades all leading (batch, channel) axes alike; call it
    per sample for different geometries within a batch.

    >>> import numpy as np, torch
    >>> transform = RandomDegrade(lambda rng: (1.0, 1.0, float(rng.uniform(2, 5))))
    >>> volume = torch.rand(1, 8, 8, 8)
    >>> degraded, params = transform(volume, np.random.default_rng(0))
    >>> bool(torch.equal(Degrade(params)(volume), degraded))
    True
    >>> transform.sample_parameters(params.seed) == params
    True
    """

    def __init__(self, sampler: Sampler, *, random_offset: bool = True) -> None:
        if not callable(sampler):
            raise ValueError(f'sampler must be callable, got {sampler!r}')
        self.sampler = sampler
        self.random_offset = bool(random_offset)

    def sample_parameters(self, seed: int) -> DegradationParameters:
        """Parameters drawn deterministically from ``seed``."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
        rng = np.random.default_rng(int(seed))
        resolution = _triplet(self.sampler(rng), 'sampled resolution')
        offset = tuple(
            _random_offset(r, rng) if self.random_offset and r > 1.0 else 0.0 for r in resolution
        )
        return DegradationParameters(
            resolution=resolution,
            offset=offset,  # type: ignore[arg-type]
            cell=route(resolution).cell,
            seed=int(seed),
        )

    def __call__(
        self,
        volume: torch.Tensor,
        rng: np.random.Generator | int | None = None,
    ) -> tuple[torch.Tensor, DegradationParameters]:
        """Return ``(degraded, parameters)``; ``rng`` may also be a seed or None."""
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        parameters = self.sample_parameters(int(generator.integers(2**63 - 1)))
        return Degrade(parameters)(volume), parameters

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.sampler!r}, random_offset={self.random_offset})'
