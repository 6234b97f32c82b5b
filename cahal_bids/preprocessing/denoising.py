"""Adaptive non-local-means denoising (ANTs, Rician noise) restricted to a mask."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cahal_bids.core.ants_bridge import ants_seed
from cahal_bids.core.errors import PreprocessingError
from cahal_bids.preprocessing.masks import bounding_box

__all__ = [
    'nlm_denoise',
]


def nlm_denoise(
    data: np.ndarray,
    mask: np.ndarray | None,
    voxel_sizes: Sequence[float],
    *,
    shrink_factor: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """ANTs adaptive non-local means (Rician) inside ``mask``; values outside are kept.

    With ``shrink_factor`` 1 the mask is handed to the filter, whose cost follows
    the masked voxels. antspyx 0.6.3 does not shrink the mask with the image, so
    the filter fails inside ITK and returns its input unchanged without an error;
    for ``shrink_factor`` > 1 the image is therefore cropped to the mask's bounding
    box and filtered without a mask. Note that ``shrink_factor`` 2 removes little
    voxel-scale noise (it filters a half-resolution copy): use 1 for ground truth.
    Raises :class:`PreparationError` if the filter leaves the masked voxels unchanged.
    """
    import ants

    array = np.asarray(data, dtype=np.float32)
    spacing = tuple(float(size) for size in voxel_sizes)
    if mask is None:
        mask = np.ones(array.shape, dtype=bool)
    if not mask.any():
        return array.copy()
    if shrink_factor == 1:
        box: tuple[slice, ...] = (slice(None),) * 3
        mask_image = ants.from_numpy(mask.astype(np.float32), spacing=spacing)
    else:
        margin = [int(math.ceil(4 * shrink_factor)) for _ in range(3)]
        box = bounding_box(mask, margin)
        mask_image = None
    crop = np.ascontiguousarray(array[box])
    with ants_seed(seed):
        filtered = ants.denoise_image(
            ants.from_numpy(crop, spacing=spacing),
            mask_image,
            shrink_factor=int(shrink_factor),
            noise_model='Rician',
        ).numpy()
    filtered = np.asarray(filtered, dtype=np.float32)
    inside = mask[box]
    if np.ptp(crop[inside]) > 0 and np.array_equal(filtered[inside], crop[inside]):
        raise PreprocessingError('ants.denoise_image returned its input unchanged (ITK error)')
    out = array.copy()
    out[box] = np.where(inside, filtered, crop)
    return out
