"""Linear ITK transforms as 4 x 4 matrices: read, write, compose, compare (TRE).

ITK (and so ANTs) stores a transform from *moving* to *fixed* as the map that
takes a point of the fixed space to the moving space (the direction resampling
needs), in LPS world coordinates:
``y = A (x - c) + t + c`` with the matrix ``A``, translation ``t`` and centre
``c`` (the ``FixedParameters``). As a homogeneous matrix that is
``[[A, t + c - A c], [0, 1]]``.

Two transforms into the same template are compared by the mean, over the
template's brain voxels, of the distance between the points each maps them to
(:func:`mean_displacement`): the target registration error (TRE) of one
registration against a reference one, in millimetres.

>>> import numpy as np
>>> shift = np.eye(4); shift[:3, 3] = [3.0, 4.0, 0.0]
>>> float(mean_displacement(shift, np.eye(4), np.zeros((5, 3))))
5.0
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cahal_bids.core.atomic import write_text_atomic
from cahal_bids.core.errors import CahalError

__all__ = [
    'LPS',
    'TransformFileError',
    'compose',
    'mask_points',
    'mean_displacement',
    'moving_voxel_coordinates',
    'read_itk_affine',
    'rigid_matrix',
    'write_itk_affine',
]

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""The matrix taking RAS (NIfTI world) coordinates to LPS (ITK world) ones, and back."""

_LINEAR_TYPES = (
    'AffineTransform',
    'MatrixOffsetTransformBase',
    'Euler3DTransform',
    'VersorRigid3DTransform',
    'Rigid3DTransform',
    'ScaleVersor3DTransform',
    'ScaleSkewVersor3DTransform',
    'Similarity3DTransform',
)


class TransformFileError(CahalError):
    """A transform file that is not one 3D linear ITK text transform."""


def read_itk_affine(path: str | os.PathLike[str]) -> np.ndarray:
    """The 4 x 4 LPS matrix (fixed point to moving point) of an ITK text affine.

    Accepts the text files ANTs writes for rigid and affine stages
    (``AffineTransform_double_3_3``, ``..._float_3_3``; 12 parameters, a 3-vector
    centre). Raises :class:`TransformFileError` naming the file otherwise.
    """
    text = Path(path).read_text().splitlines()
    kind = next(
        (line.split(':', 1)[1].strip() for line in text if line.startswith('Transform:')), ''
    )
    if text[:1] != ['#Insight Transform File V1.0'] or not kind.startswith(_LINEAR_TYPES):
        raise TransformFileError(f'{path}: not a linear ITK text transform ({kind or "no type"})')
    if sum(line.startswith('Transform:') for line in text) != 1:
        raise TransformFileError(f'{path}: holds more than one transform')

    def values(key: str) -> np.ndarray:
        line = next((line for line in text if line.startswith(f'{key}:')), None)
        if line is None:
            raise TransformFileError(f'{path}: no {key}')
        return np.array([float(v) for v in line.split(':', 1)[1].split()], dtype=np.float64)

    parameters, centre = values('Parameters'), values('FixedParameters')
    if not kind.startswith(('AffineTransform', 'MatrixOffsetTransformBase')):
        raise TransformFileError(
            f'{path}: {kind} is stored by angles; write it as an AffineTransform'
        )
    if parameters.size != 12 or centre.size != 3:
        raise TransformFileError(f'{path}: {kind} with {parameters.size} parameters, not 3D')
    matrix = parameters[:9].reshape(3, 3)
    homogeneous = np.eye(4)
    homogeneous[:3, :3] = matrix
    homogeneous[:3, 3] = parameters[9:] + centre - matrix @ centre
    return homogeneous


def write_itk_affine(matrix: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a 4 x 4 LPS matrix as an ITK text ``AffineTransform_double_3_3`` (centre 0).

    Written atomically; the format is the one ANTs and niworkflows read.
    """
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (4, 4) or not np.allclose(array[3], [0, 0, 0, 1]):
        raise ValueError(f'{path}: expected a 4 x 4 affine matrix, got {array.tolist()}')
    parameters = [*array[:3, :3].ravel(), *array[:3, 3]]
    text = (
        '#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n'
        f'Parameters: {" ".join(repr(float(v)) for v in parameters)}\n'
        'FixedParameters: 0 0 0\n'
    )
    return write_text_atomic(path, text)


def compose(to_intermediate: np.ndarray, intermediate_to_target: np.ndarray) -> np.ndarray:
    """The transform image -> target from image -> intermediate and intermediate -> target.

    Both in ITK's convention (each maps its fixed space's points to its moving
    space), e.g. FLAIR -> T1w and T1w -> template give FLAIR -> template: a
    template point is taken to the T1w, then to the FLAIR. This is how fMRIPrep
    carries BOLD runs to a template through the T1w.
    """
    return np.asarray(to_intermediate) @ np.asarray(intermediate_to_target)


def mask_points(mask_file: str | os.PathLike[str], *, step: int = 1) -> np.ndarray:
    """LPS world coordinates (N x 3, mm) of the non-zero voxels of a mask image.

    ``step`` > 1 keeps every ``step``-th voxel along each axis (a regular subsample:
    the mean displacement of a linear transform changes by far less than 0.01 mm).
    """
    import nibabel as nib

    image = nib.load(str(mask_file))
    data = np.asarray(image.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    index = np.argwhere(data[::step, ::step, ::step] > 0).astype(np.float64) * step
    ras = index @ image.affine[:3, :3].T + image.affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def moving_voxel_coordinates(
    fixed_points: np.ndarray, transform: np.ndarray, moving_affine: np.ndarray
) -> np.ndarray:
    """Voxel coordinates (N x 3) in the moving image of fixed-space points (RAS mm, N x 3).

    ``transform`` is a 4 x 4 LPS matrix in ITK's convention (fixed point to moving
    point, :func:`read_itk_affine`); ``moving_affine`` the moving image's NIfTI
    affine. Plain matrix products: the result does not depend on thread counts,
    unlike ITK's resampler, whose last digits change with them.

    >>> shift = np.eye(4); shift[:3, 3] = [0.0, 0.0, 2.0]  # LPS z = RAS z
    >>> moving_voxel_coordinates(np.zeros((1, 3)), shift, np.diag([2.0, 2.0, 2.0, 1.0]))
    array([[0., 0., 1.]])
    """
    points = np.asarray(fixed_points, dtype=np.float64).reshape(-1, 3)
    to_voxels = np.linalg.inv(np.asarray(moving_affine, dtype=np.float64)) @ LPS
    whole = to_voxels @ np.asarray(transform, dtype=np.float64) @ LPS
    return points @ whole[:3, :3].T + whole[:3, 3]


def rigid_matrix(degrees: float, axis: int, shift: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """A 4 x 4 rotation by ``degrees`` about coordinate ``axis`` (0, 1, 2), then ``shift``.

    >>> np.round(rigid_matrix(90, 2, (1.0, 0.0, 0.0)) @ [1.0, 0.0, 0.0, 1.0], 6)
    array([1., 1., 0., 1.])
    """
    angle = np.deg2rad(degrees)
    matrix = np.eye(4)
    others = [a for a in range(3) if a != axis]
    matrix[np.ix_(others, others)] = [
        [np.cos(angle), -np.sin(angle)],
        [np.sin(angle), np.cos(angle)],
    ]
    matrix[:3, 3] = shift
    return matrix


def mean_displacement(first: np.ndarray, second: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between where two 4 x 4 transforms take the same ``points``."""
    array = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if array.shape[0] == 0:
        raise ValueError('no points to compare the transforms on')
    difference = np.asarray(first) - np.asarray(second)
    moved = array @ difference[:3, :3].T + difference[:3, 3]
    return float(np.linalg.norm(moved, axis=1).mean())
