"""The native 1 mm output grid (the product's output-grid contract) and resampling onto it.

For an input with voxel counts ``n``, voxel sizes ``r`` (the column norms of its
affine ``M``) the output grid

* keeps the input's voxel axes: the direction cosines ``D = M[:3, :3] / r``
  (column-wise), oblique and sheared included, and the input's axis order;
* has ``spacing`` (1 mm) along every axis and ``m_i = floor(n_i * r_i / spacing + 0.5)``
  voxels (half rounds up; at least 1), see :func:`native_shape`;
* starts at the same physical corner of the field of view: the outer edge of input
  voxel 0, ``c = M @ (-0.5, -0.5, -0.5, 1)``.

Hence ``M' = [spacing * D | c + D @ (spacing / 2, spacing / 2, spacing / 2)]``.
The field of view is kept where ``n_i * r_i`` is a multiple of the spacing; else
it is shortened or lengthened at the far end by at most half an output voxel.

>>> import numpy as np
>>> grid = native_grid((4, 4, 3), np.diag([1.0, 1.0, 3.0, 1.0]))
>>> grid.shape
(4, 4, 9)
>>> grid.affine[:3, 3].tolist()  # corner (-0.5, -0.5, -1.5) plus half a millimetre
[0.0, 0.0, -1.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cahal_bids.core.orientation import Reorientation
from cahal_bids.core.resampling import apply_separable, box_weights, linear_weights

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

__all__ = [
    'low_resolution_affine',
    'ROUNDING_TOLERANCE',
    'NativeGrid',
    'axis_operator',
    'native_grid',
    'native_shape',
    'resample_image_to_native_grid',
    'resample_to_native_grid',
]

ROUNDING_TOLERANCE = 1e-4
"""Slack (in output voxels) added before rounding ``n * r / spacing``.

Header voxel sizes are stored in float32, so a field of view meant to be 22.5 mm
can read 22.4999995; the slack makes such exact halves round up as intended.
"""


@dataclass(frozen=True, eq=False)
class NativeGrid:
    """A regular voxel grid in world space: voxel counts and voxel-to-world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    """Read-only 4x4 float64 voxel-to-world matrix."""

    @property
    def voxel_sizes(self) -> tuple[float, float, float]:
        """Spacing along each voxel axis (column norms of the affine), in mm."""
        norms = np.sqrt(np.sum(self.affine[:3, :3] ** 2, axis=0))
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines of the voxel axes, one per column (3x3)."""
        return self.affine[:3, :3] / np.asarray(self.voxel_sizes)

    @property
    def corner(self) -> np.ndarray:
        """World coordinates (mm) of the outer corner of voxel 0: affine @ (-0.5, -0.5, -0.5)."""
        return (self.affine @ np.array([-0.5, -0.5, -0.5, 1.0]))[:3]


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))


def _check_spacing(spacing: float) -> float:
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f'spacing must be finite and > 0, got {spacing}')
    return float(spacing)


def native_shape(
    shape: Sequence[int], voxel_sizes: Sequence[float], spacing: float = 1.0
) -> tuple[int, int, int]:
    """Voxel counts of the native grid: ``max(1, floor(n * r / spacing + 0.5))`` per axis.

    Half rounds up (not to even); :data:`ROUNDING_TOLERANCE` absorbs float32 noise.

    >>> native_shape((10, 10, 5), (1.0, 0.95, 2.5))
    (10, 10, 13)
    """
    spacing = _check_spacing(spacing)
    if len(shape) != 3 or len(voxel_sizes) != 3:
        raise ValueError(f'expected 3 voxel counts and 3 voxel sizes, got {shape}, {voxel_sizes}')
    counts = []
    for n, r in zip(shape, voxel_sizes, strict=True):
        if int(n) < 1 or not (math.isfinite(r) and r > 0):
            raise ValueError(f'invalid voxel count {n} or voxel size {r} mm')
        counts.append(max(1, math.floor(int(n) * float(r) / spacing + 0.5 + ROUNDING_TOLERANCE)))
    return counts[0], counts[1], counts[2]


def native_grid(shape: Sequence[int], affine: npt.ArrayLike, spacing: float = 1.0) -> NativeGrid:
    """The native grid (see the module docstring) of an image with this shape and affine."""
    spacing = _check_spacing(spacing)
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f'affine must be a finite 4x4 matrix, got {matrix.tolist()}')
    if len(shape) < 3:
        raise ValueError(f'shape must have 3 voxel counts, got {tuple(shape)}')
    sizes = _voxel_sizes(matrix)
    out_shape = native_shape(tuple(shape[:3]), tuple(sizes.tolist()), spacing)
    direction = matrix[:3, :3] / sizes
    corner = (matrix @ np.array([-0.5, -0.5, -0.5, 1.0]))[:3]
    out = np.eye(4)
    out[:3, :3] = spacing * direction
    out[:3, 3] = corner + direction @ np.full(3, 0.5 * spacing)
    out.setflags(write=False)
    return NativeGrid(shape=out_shape, affine=out)


def axis_operator(
    n_in: int,
    voxel_size: float,
    n_out: int,
    spacing: float = 1.0,
    *,
    flipped: bool = False,
) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix that resamples one axis onto the native grid.

    Linear interpolation when ``voxel_size >= spacing`` (what the network consumes),
    exact area average (:func:`~cahal_bids.core.resampling.box_weights`) when the input is
    finer, so sub-millimetre detail is averaged rather than aliased. The output
    grid starts at the outer edge of the *original* voxel 0; on an axis that
    ``flipped`` (reversed by reorientation) that edge is at the far end, so the
    grid is anchored there: ``origin = n_in * voxel_size - n_out * spacing``.
    """
    origin = n_in * voxel_size - n_out * spacing if flipped else 0.0
    weights = linear_weights if voxel_size >= spacing else box_weights
    return weights(n_in, voxel_size, n_out, spacing, origin)


def resample_to_native_grid(
    volume: torch.Tensor,
    voxel_sizes: Sequence[float],
    out_shape: Sequence[int],
    *,
    flipped: Sequence[bool] = (False, False, False),
    spacing: float = 1.0,
) -> torch.Tensor:
    """Resample the last three axes of ``volume`` onto the native grid, in its dtype and device.

    ``voxel_sizes`` and ``out_shape`` are given in the array's own axis order
    (:func:`native_shape` of the original image, reordered like the array).
    ``flipped[i]`` says that axis ``i`` of ``volume`` runs opposite to the
    original image's axis, as after :meth:`Reorientation.to_ras` (pass
    ``Reorientation.flipped_in_ras``); see :func:`axis_operator`.
    """
    spacing = _check_spacing(spacing)
    if volume.ndim < 3:
        raise ValueError(f'expected at least 3 dimensions, got shape {tuple(volume.shape)}')
    if len(voxel_sizes) != 3 or len(out_shape) != 3 or len(flipped) != 3:
        raise ValueError(
            f'expected 3 voxel sizes, output sizes and flips, got {tuple(voxel_sizes)}, '
            f'{tuple(out_shape)}, {tuple(flipped)}'
        )
    n_in = tuple(int(size) for size in volume.shape[-3:])
    matrices = [
        axis_operator(n, float(r), int(m), spacing, flipped=bool(flip))
        for n, r, m, flip in zip(n_in, voxel_sizes, out_shape, flipped, strict=True)
    ]
    return apply_separable(volume, matrices)


def resample_image_to_native_grid(
    data: np.ndarray | torch.Tensor,
    affine: npt.ArrayLike,
    *,
    spacing: float = 1.0,
) -> tuple[np.ndarray | torch.Tensor, NativeGrid]:
    """Resample an image (original voxel axes) onto its native grid, through RAS order.

    The array is reoriented to RAS, resampled with :func:`resample_to_native_grid`
    (as the network pipeline does) and reoriented back, so the result is on
    :func:`native_grid` ``(data.shape[-3:], affine, spacing)`` and matches
    resampling in the original axes. NumPy input gives NumPy output; integer input
    is computed in float32, floating input in its own dtype. Leading axes before
    the last three are carried along.
    """
    import torch

    is_numpy = isinstance(data, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(data)) if is_numpy else data
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    shape = tuple(int(size) for size in tensor.shape[-3:])
    grid = native_grid(shape, affine, spacing)
    source = Reorientation.from_affine(affine, shape)
    ras = resample_to_native_grid(
        source.to_ras(tensor),
        source.sizes_to_ras(_voxel_sizes(np.asarray(affine, dtype=np.float64)).tolist()),
        source.sizes_to_ras(grid.shape),
        flipped=source.flipped_in_ras,
        spacing=spacing,
    )
    out = source.from_ras(ras)  # the grid keeps the voxel axes, so the same reorientation
    return (out.numpy() if is_numpy else out), grid


def low_resolution_affine(affine: npt.ArrayLike, resolution: Sequence[float]) -> np.ndarray:
    """Affine of a coarser grid (``resolution`` mm) sharing the field-of-view corner of ``affine``.

    The inverse relation of :func:`native_grid`: a 1 mm grid acquired at ``resolution``
    (with no slice offset) has this affine, with the same direction cosines and the same
    outer corner of voxel 0.

    >>> low_resolution_affine(np.eye(4), (1.0, 1.0, 4.0))[:3, 3].tolist()
    [0.0, 0.0, 1.5]
    """
    matrix = np.asarray(affine, dtype=np.float64)
    directions = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0)
    corner = matrix[:3, :3] @ np.full(3, -0.5) + matrix[:3, 3]
    spacing = np.asarray(resolution, dtype=np.float64)
    result = np.eye(4)
    result[:3, :3] = directions * spacing
    result[:3, 3] = corner + directions @ (0.5 * spacing)
    return result
