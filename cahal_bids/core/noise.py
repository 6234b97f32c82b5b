"""The noise level of an acquired image, estimated from its flattest tissue.

The adaptive projection onto the acquired data
(:meth:`~cahal_bids.physics.consistency.AcquiredGrid.project_adaptive`) needs the standard
deviation of the acquisition's noise, in the image's own units, with no ground truth.
The estimate uses the finest detail there is: 2 x 2 Haar blocks in the plane of the two
finest axes, one slice at a time along the thickest (so a thick axis' slice-to-slice
change never counts as noise). In a block of white Gaussian noise the diagonal detail
(``a - b - c + d``) / 2 has the noise's standard deviation and is independent of the two
edge details; so choosing the flattest blocks by their edge details leaves the diagonal
detail's noise unbiased while discarding most of the anatomy. Only blocks inside the
tissue count (air, and the zeros of skull-stripped images, would pull the estimate down),
and the median absolute deviation (x 1.4826) turns the rest into a standard deviation.

What anatomy survives the selection can only raise the estimate, which is the safe side
for the projection (a larger noise level projects less). skimage's ``estimate_sigma``
(wavelet median absolute deviation over the whole image) is the library equivalent; it is
not used because it cannot be restricted to tissue, so the zeros around a skull-stripped
head drag its estimate towards zero, the unsafe side.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> image = 100.0 + rng.normal(0.0, 2.0, (40, 40, 12))  # flat tissue, noise sd 2
>>> round(estimate_noise_sd(image, (1.0, 1.0, 4.0), image > 50.0), 1)
2.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ['FLAT_FRACTION', 'MIN_BLOCKS', 'estimate_noise_sd']

FLAT_FRACTION = 0.3
"""The fraction of tissue blocks (the flattest, by their larger edge detail) whose diagonal
detail estimates the noise."""

MIN_BLOCKS = 200
"""Fewer flat tissue blocks than this and the noise level is unknown (None)."""

MAD_TO_SD = 1.4826
"""Median absolute deviation to standard deviation, for Gaussian noise."""


def estimate_noise_sd(
    volume: np.ndarray,
    voxel_sizes: Sequence[float],
    inside: np.ndarray | None = None,
    *,
    flat_fraction: float = FLAT_FRACTION,
) -> float | None:
    """The noise standard deviation of ``volume`` (its units), or None if it cannot tell.

    ``voxel_sizes`` (mm, one per axis) name the thickest axis, along which the volume is
    cut into slices; ``inside`` (boolean, same shape; None: every non-zero voxel) is the
    tissue, and a Haar block counts only if its four voxels are inside.
    """
    data = np.asarray(volume, dtype=np.float64)
    if data.ndim != 3 or len(voxel_sizes) != 3:
        raise ValueError(f'expected a 3D volume and 3 voxel sizes, got {data.shape}')
    if not 0.0 < flat_fraction <= 1.0:
        raise ValueError(f'flat_fraction must be in (0, 1], got {flat_fraction}')
    mask = data != 0.0 if inside is None else np.asarray(inside, dtype=bool)
    if mask.shape != data.shape:
        raise ValueError(f'mask of shape {mask.shape} does not match the volume {data.shape}')
    thickest = int(np.argmax(np.asarray(voxel_sizes, dtype=float)))
    data, mask = np.moveaxis(data, thickest, 0), np.moveaxis(mask, thickest, 0)
    rows, cols = (data.shape[1] // 2) * 2, (data.shape[2] // 2) * 2
    if rows == 0 or cols == 0:
        return None

    def corners(array: np.ndarray) -> tuple[np.ndarray, ...]:
        array = array[:, :rows, :cols]
        return tuple(array[:, i::2, j::2] for i in (0, 1) for j in (0, 1))

    a, b, c, d = corners(data)
    in_a, in_b, in_c, in_d = corners(mask)
    tissue = in_a & in_b & in_c & in_d
    if int(tissue.sum()) < MIN_BLOCKS:
        return None
    diagonal = (a - b - c + d)[tissue] / 2.0
    edges = np.maximum(np.abs(a + b - c - d), np.abs(a - b + c - d))[tissue] / 2.0
    flat = edges <= np.quantile(edges, flat_fraction)
    if int(flat.sum()) < MIN_BLOCKS:
        return None
    return float(MAD_TO_SD * np.median(np.abs(diagonal[flat])))
