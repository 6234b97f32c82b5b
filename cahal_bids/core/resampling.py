"""Separable 1D resampling operators on regular grids, measured in millimetres.

Everything that changes a voxel grid in cahal-bids (the trilinear input to the
network, the box point-spread function of the degradation model, its trilinear
return to 1 mm) is a product of three 1D linear operators, one per voxel axis.
This module builds those operators as dense ``(n_out, n_in)`` matrices and
applies them to the last three axes of a tensor.

Coordinates along an axis are millimetres from the *outer edge* of input voxel 0
(the corner of the field of view): input voxel ``k`` spans
``[k * spacing_in, (k + 1) * spacing_in)`` and has its centre at
``(k + 0.5) * spacing_in``; output voxel ``j`` spans
``[origin + j * spacing_out, origin + (j + 1) * spacing_out)``.

Every row of every operator sums to one, so a constant stays that constant.

>>> import numpy as np
>>> linear_weights(2, 2.0, 4, 1.0).round(3).tolist()
[[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]
>>> box_weights(4, 1.0, 2, 2.0).tolist()
[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ['apply_separable', 'box_weights', 'linear_weights']


def _check(n_in: int, spacing_in: float, n_out: int, spacing_out: float) -> None:
    if n_in < 1 or n_out < 1:
        raise ValueError(f'grid sizes must be >= 1, got n_in={n_in}, n_out={n_out}')
    if not (np.isfinite(spacing_in) and spacing_in > 0):
        raise ValueError(f'spacing_in must be finite and > 0, got {spacing_in}')
    if not (np.isfinite(spacing_out) and spacing_out > 0):
        raise ValueError(f'spacing_out must be finite and > 0, got {spacing_out}')


def linear_weights(
    n_in: int,
    spacing_in: float,
    n_out: int,
    spacing_out: float,
    origin: float = 0.0,
) -> np.ndarray:
    """Linear interpolation from voxel centres to voxel centres, clamped at the edges.

    Output voxel ``j`` takes the value at ``origin + (j + 0.5) * spacing_out``;
    beyond the outermost input centres the edge value is repeated (as
    ``torch.nn.functional.interpolate(..., align_corners=False)`` does).
    """
    _check(n_in, spacing_in, n_out, spacing_out)
    centres_mm = origin + (np.arange(n_out) + 0.5) * spacing_out
    position = np.clip(centres_mm / spacing_in - 0.5, 0.0, n_in - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, n_in - 1)
    frac = position - lower
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lower), 1.0 - frac)
    np.add.at(weights, (rows, upper), frac)
    return weights


def box_weights(
    n_in: int,
    spacing_in: float,
    n_out: int,
    spacing_out: float,
    origin: float = 0.0,
) -> np.ndarray:
    """Exact area average (box point-spread function) with fractional overlaps.

    Output voxel ``j`` is the mean of the input signal over its extent, each input
    voxel weighted by the length it shares with it. The part of an output voxel
    that lies outside the input field of view carries no signal and is left out
    of the mean (the average is over the covered length). An output voxel that
    does not overlap the input at all takes the nearest input voxel.
    """
    _check(n_in, spacing_in, n_out, spacing_out)
    out_lo = origin + np.arange(n_out)[:, None] * spacing_out
    out_hi = out_lo + spacing_out
    in_lo = np.arange(n_in)[None, :] * spacing_in
    in_hi = in_lo + spacing_in
    overlap = np.clip(np.minimum(out_hi, in_hi) - np.maximum(out_lo, in_lo), 0.0, None)
    covered = overlap.sum(axis=1, keepdims=True)
    empty = covered[:, 0] <= 0
    if empty.any():
        centres = (out_lo[empty, 0] + 0.5 * spacing_out) / spacing_in - 0.5
        nearest = np.clip(np.rint(centres), 0, n_in - 1).astype(np.int64)
        overlap[np.flatnonzero(empty), nearest] = 1.0
        covered = overlap.sum(axis=1, keepdims=True)
    return overlap / covered


def _is_identity(matrix: np.ndarray | torch.Tensor) -> bool:
    rows, columns = matrix.shape
    if rows != columns:
        return False
    if isinstance(matrix, np.ndarray):
        return bool(np.array_equal(matrix, np.eye(rows, dtype=matrix.dtype)))
    import torch

    identity = torch.eye(rows, dtype=matrix.dtype, device=matrix.device)
    return bool(torch.equal(matrix, identity))


def apply_separable(
    volume: torch.Tensor,
    matrices: Sequence[np.ndarray | torch.Tensor | None],
) -> torch.Tensor:
    """Apply one matrix per spatial axis to the last three axes of ``volume``.

    ``matrices[i]`` has shape ``(n_out_i, n_in_i)``; ``None`` or an identity matrix
    leaves that axis as it is (without the cost of a product). Leading axes (batch,
    channel) are carried along, so a batch of patches on a GPU is resampled in one call.
    Computation runs in ``volume``'s dtype and device.
    """
    import torch

    if volume.ndim < 3:
        raise ValueError(f'expected at least 3 dimensions, got shape {tuple(volume.shape)}')
    if len(matrices) != 3:
        raise ValueError(f'expected 3 matrices (one per spatial axis), got {len(matrices)}')
    out = volume
    for axis, matrix in enumerate(matrices):
        if matrix is None or _is_identity(matrix):
            continue
        weights = torch.as_tensor(matrix, dtype=volume.dtype, device=volume.device)
        dim = out.ndim - 3 + axis
        if weights.ndim != 2 or weights.shape[1] != out.shape[dim]:
            raise ValueError(
                f'matrix for axis {axis} has shape {tuple(weights.shape)}, '
                f'expected (n_out, {out.shape[dim]})'
            )
        moved = out.movedim(dim, -1)
        out = torch.matmul(moved, weights.T).movedim(-1, dim)
    return out.contiguous()
