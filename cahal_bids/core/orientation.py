"""Lossless reorientation of voxel arrays to RAS order (axis permutations and flips only).

:class:`Reorientation` permutes and flips the three voxel axes of an image so
that its voxel axes point, as closely as the affine allows, to Right, Anterior and
Superior; oblique images get the closest axes (nibabel's ``io_orientation``). No
voxel value is interpolated, so :meth:`Reorientation.from_ras` undoes
:meth:`Reorientation.to_ras` exactly, and :attr:`Reorientation.ras_affine` gives
every voxel centre the same world coordinates it had before.

Arrays are NumPy arrays or torch tensors whose **last three** axes are the voxel
axes; leading axes (batch, channel) are carried along. Only the order and
direction of the axes are used, not their lengths, so the same object also
reorients any grid with the same voxel axes, such as the image's native 1 mm grid
(:func:`cahal_bids.core.grid.native_grid` keeps the direction cosines).

>>> import numpy as np
>>> lps = np.diag([-1.0, -1.0, 1.0, 1.0])
>>> reo = Reorientation.from_affine(lps, (2, 3, 4))
>>> reo.source_code, reo.ras_shape, reo.flipped_in_ras
('LPS', (2, 3, 4), (True, True, False))
>>> x = np.arange(24.0).reshape(2, 3, 4)
>>> bool((reo.from_ras(reo.to_ras(x)) == x).all())
True
>>> reo.ras_affine[:3, 3].tolist()
[-1.0, -2.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

__all__ = ['RAS_ORNT', 'Reorientation']

RAS_ORNT = axcodes2ornt(('R', 'A', 'S'))
"""nibabel orientation array of RAS voxel order."""

ArrayT = TypeVar('ArrayT', np.ndarray, 'torch.Tensor')
T = TypeVar('T')


def _check_affine_shape(
    affine: npt.ArrayLike, shape: Sequence[int]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    matrix = np.array(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f'affine must be a finite 4x4 matrix, got {matrix.tolist()}')
    if len(shape) < 3 or any(int(size) < 1 for size in shape[:3]):
        raise ValueError(f'shape must have 3 positive voxel counts, got {tuple(shape)}')
    norms = np.sqrt(np.sum(matrix[:3, :3] ** 2, axis=0))
    if not np.all(norms > 0) or np.linalg.matrix_rank(matrix[:3, :3] / norms) < 3:
        raise ValueError(f'affine is singular: {matrix[:3].tolist()}')
    matrix.setflags(write=False)
    return matrix, (int(shape[0]), int(shape[1]), int(shape[2]))


@dataclass(frozen=True, eq=False)
class Reorientation:
    """How the voxel axes of an image map to RAS voxel order.

    RAS axis ``j`` is source axis ``ras_axes[j]``, reversed where ``flipped_in_ras[j]``.
    Build it with :meth:`from_affine`.
    """

    affine: np.ndarray
    """Source voxel-to-world affine (read-only 4x4 float64)."""
    shape: tuple[int, int, int]
    """Source voxel counts."""
    ras_axes: tuple[int, int, int]
    """Source axis that becomes RAS axis 0, 1, 2."""
    flipped_in_ras: tuple[bool, bool, bool]
    """Whether RAS axis 0, 1, 2 runs opposite to its source axis."""

    @classmethod
    def from_affine(cls, affine: npt.ArrayLike, shape: Sequence[int]) -> Reorientation:
        """Reorientation of an image with this affine and (at least 3D) shape."""
        matrix, shape3 = _check_affine_shape(affine, shape)
        ornt = ornt_transform(io_orientation(matrix), RAS_ORNT)
        # ornt[i] = (RAS axis that source axis i becomes, -1 if reversed), as in nibabel.
        ras_axes = tuple(int(axis) for axis in np.argsort(ornt[:, 0]))
        flips = tuple(bool(ornt[axis, 1] < 0) for axis in ras_axes)
        return cls(
            affine=matrix,
            shape=shape3,
            ras_axes=(ras_axes[0], ras_axes[1], ras_axes[2]),
            flipped_in_ras=(flips[0], flips[1], flips[2]),
        )

    @property
    def ornt(self) -> np.ndarray:
        """The nibabel orientation transform (source to RAS), usable with ``apply_orientation``."""
        ornt = np.empty((3, 2))
        for ras_axis, (axis, flip) in enumerate(
            zip(self.ras_axes, self.flipped_in_ras, strict=True)
        ):
            ornt[axis] = (ras_axis, -1.0 if flip else 1.0)
        return ornt

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        """Voxel counts of the reoriented array."""
        return self.sizes_to_ras(self.shape)

    @property
    def ras_affine(self) -> np.ndarray:
        """Affine of the reoriented array: same world coordinates for every voxel centre."""
        return self.affine @ inv_ornt_aff(self.ornt, self.shape)

    @property
    def source_code(self) -> str:
        """Axis codes of the source voxel axes, such as ``'LPS'``."""
        return ''.join(nib.aff2axcodes(self.affine))

    @property
    def is_identity(self) -> bool:
        """Whether the source is already in RAS voxel order (nothing to do)."""
        return self.ras_axes == (0, 1, 2) and not any(self.flipped_in_ras)

    def sizes_to_ras(self, values: Sequence[T]) -> tuple[T, T, T]:
        """Reorder per-axis values (voxel sizes, shape) from source to RAS order."""
        if len(values) != 3:
            raise ValueError(f'expected 3 per-axis values, got {tuple(values)}')
        first, second, third = (values[axis] for axis in self.ras_axes)
        return first, second, third

    def sizes_from_ras(self, values: Sequence[T]) -> tuple[T, T, T]:
        """Reorder per-axis values from RAS back to source order."""
        if len(values) != 3:
            raise ValueError(f'expected 3 per-axis values, got {tuple(values)}')
        ordered: list[T] = [values[0]] * 3
        for ras_axis, axis in enumerate(self.ras_axes):
            ordered[axis] = values[ras_axis]
        return ordered[0], ordered[1], ordered[2]

    def to_ras(self, array: ArrayT) -> ArrayT:
        """Source-order array (last three axes) to RAS order, C-contiguous.

        The result shares memory with ``array`` only when :attr:`is_identity` and
        ``array`` is already contiguous.

        Same as ``nibabel.orientations.apply_orientation(array, self.ornt)`` for a
        3D NumPy array.
        """
        _check_spatial(array)
        lead = array.ndim - 3
        order = (*range(lead), *(lead + axis for axis in self.ras_axes))
        flip_dims = tuple(lead + j for j in range(3) if self.flipped_in_ras[j])
        return _contiguous(_flip(_permute(array, order), flip_dims))

    def from_ras(self, array: ArrayT) -> ArrayT:
        """Exact inverse of :meth:`to_ras` (C-contiguous, same sharing rule)."""
        _check_spatial(array)
        lead = array.ndim - 3
        flip_dims = tuple(lead + j for j in range(3) if self.flipped_in_ras[j])
        inverse = np.argsort(self.ras_axes)
        order = (*range(lead), *(lead + int(j) for j in inverse))
        flipped = _flip(array, flip_dims)
        return _contiguous(_permute(flipped, order))


def _is_numpy(array: object) -> bool:
    return isinstance(array, np.ndarray)


def _check_spatial(array: np.ndarray | torch.Tensor) -> None:
    if array.ndim < 3:
        raise ValueError(f'expected at least 3 (voxel) axes, got shape {tuple(array.shape)}')


def _permute(array: ArrayT, order: tuple[int, ...]) -> ArrayT:
    if _is_numpy(array):
        return array.transpose(order)
    return array.permute(order)


def _flip(array: ArrayT, dims: tuple[int, ...]) -> ArrayT:
    if not dims:
        return array
    if _is_numpy(array):
        return np.flip(array, axis=dims)
    return array.flip(dims)


def _contiguous(array: ArrayT) -> ArrayT:
    if _is_numpy(array):
        return np.ascontiguousarray(array)
    return array.contiguous()
