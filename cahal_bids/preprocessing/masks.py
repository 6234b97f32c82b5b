"""Head and brain masks: head mask by thresholding, skull-stripped inputs recognised,
and the brain mask of a skull-stripped image. Morphology radii are in millimetres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from cahal_bids.core.normalization import DEFAULT_NORMALIZATION

__all__ = [
    'BACKGROUND_LEVEL',
    'BRAIN_EXTRACTED_MAX_LITRES',
    'BRAIN_EXTRACTED_ZERO_FRACTION',
    'RIM_MM',
    'bounding_box',
    'close',
    'dilate',
    'erode',
    'estimate_head_mask',
    'largest_component',
    'looks_brain_extracted',
    'open_',
    'stripped_brain_mask',
]


BRAIN_EXTRACTED_MAX_LITRES = 2.3
"""A head mask larger than this is a head, not a skull-stripped brain."""

BRAIN_EXTRACTED_ZERO_FRACTION = 0.95
"""Fraction of zero voxels, beyond 2 mm outside the head mask, of a skull-stripped image."""

BACKGROUND_LEVEL = float(DEFAULT_NORMALIZATION['head_fraction'])
"""Normalised intensity at or below which a voxel of a skull-stripped image is background."""

RIM_MM = 2.0
"""Depth of the head mask's outer rim searched for background (skull-stripped inputs)."""

HEAD_SMOOTHING_MM = 1.0

HEAD_CLOSING_MM = 3.0

OUTSIDE_MARGIN_MM = 2.0


def _sampling(voxel_sizes: Sequence[float] | None) -> tuple[float, float, float]:
    if voxel_sizes is None:
        return (1.0, 1.0, 1.0)
    return (float(voxel_sizes[0]), float(voxel_sizes[1]), float(voxel_sizes[2]))


def dilate(mask: np.ndarray, radius: float, sampling: Sequence[float]) -> np.ndarray:
    """Dilation by a ball of ``radius`` mm (exact, via the Euclidean distance transform)."""
    if mask.all() or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=sampling) <= radius


def erode(mask: np.ndarray, radius: float, sampling: Sequence[float]) -> np.ndarray:
    """Erosion by a ball of ``radius`` mm; outside the field of view counts as background."""
    if not mask.any():
        return mask.copy()
    padded = np.pad(mask, 1)
    distance = ndimage.distance_transform_edt(padded, sampling=sampling)
    return distance[1:-1, 1:-1, 1:-1] > radius


def close(mask: np.ndarray, radius: float, sampling: Sequence[float]) -> np.ndarray:
    """Closing by a ball of ``radius`` mm, padded so that the field of view edge does not erode."""
    pad = [int(math.ceil(radius / size)) + 1 for size in sampling]
    padded = np.pad(mask, [(p, p) for p in pad])
    closed = erode(dilate(padded, radius, sampling), radius, sampling)
    return closed[pad[0] : -pad[0], pad[1] : -pad[1], pad[2] : -pad[2]] | mask


def open_(mask: np.ndarray, radius: float, sampling: Sequence[float]) -> np.ndarray:
    return dilate(erode(mask, radius, sampling), radius, sampling) & mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def bounding_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, slice, slice]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (clipped)."""
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        start = max(int(hits[0]) - margin[axis], 0)
        stop = min(int(hits[-1]) + margin[axis] + 1, mask.shape[axis])
        slices.append(slice(start, stop))
    return slices[0], slices[1], slices[2]


def estimate_head_mask(
    data: np.ndarray,
    voxel_sizes: Sequence[float] | None = None,
    *,
    head_fraction: float = float(DEFAULT_NORMALIZATION['head_fraction']),
    reference_percentile: float = float(DEFAULT_NORMALIZATION['head_reference_percentile']),
) -> np.ndarray:
    """Head (or, for skull-stripped images, brain) mask from intensities alone.

    Gaussian smoothing with sigma 1 mm, threshold at ``head_fraction`` times the
    ``reference_percentile`` of the raw image, largest 6-connected component,
    closing with a 3 mm ball, 3D hole filling. An image with no positive voxel
    gives an empty mask.
    """
    sampling = _sampling(voxel_sizes)
    array = np.asarray(data, dtype=np.float32)
    reference = float(np.percentile(array, reference_percentile))
    if not reference > 0:
        return np.zeros(array.shape, dtype=bool)
    sigma = [HEAD_SMOOTHING_MM / size for size in sampling]
    smooth = ndimage.gaussian_filter(array, sigma, mode='nearest')
    mask = largest_component(smooth > head_fraction * reference)
    if not mask.any():
        return mask
    mask = close(mask, HEAD_CLOSING_MM, sampling)
    return ndimage.binary_fill_holes(mask)


def looks_brain_extracted(
    data: np.ndarray, head: np.ndarray, voxel_sizes: Sequence[float] | None = None
) -> tuple[bool, dict[str, float]]:
    """Whether an image is skull-stripped, and the evidence.

    Skull-stripped means: at least :data:`BRAIN_EXTRACTED_ZERO_FRACTION` of the
    voxels more than 2 mm outside ``head`` are zero (within 1e-3 of the image's
    99.9th percentile) *and* the head mask is at most
    :data:`BRAIN_EXTRACTED_MAX_LITRES`. Full-head images with a zeroed background
    fail the second test, brain-sized crops with a noisy background the first.
    """
    sampling = _sampling(voxel_sizes)
    array = np.asarray(data, dtype=np.float32)
    litres = float(head.sum()) * float(np.prod(sampling)) / 1e6
    outside = ~dilate(head, OUTSIDE_MARGIN_MM, sampling)
    reference = float(np.percentile(array, 99.9))
    if outside.any() and reference > 0:
        zero_fraction = float(np.mean(np.abs(array[outside]) <= 1e-3 * reference))
    else:
        zero_fraction = 0.0
    decision = zero_fraction >= BRAIN_EXTRACTED_ZERO_FRACTION and (
        litres <= BRAIN_EXTRACTED_MAX_LITRES
    )
    return bool(decision), {'head_litres': litres, 'outside_zero_fraction': zero_fraction}


def stripped_brain_mask(image: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Brain mask of a skull-stripped, normalised 1 mm image.

    The head mask's 1 mm smoothing grows it beyond the stripped brain; the voxels
    of its outer :data:`RIM_MM` at most :data:`BACKGROUND_LEVEL` (of the
    normalised scale) are that background and are removed (largest component,
    holes filled). Dark voxels deeper inside (CSF in fissures and ventricles) stay.
    """
    rim = head & ~erode(head, RIM_MM, (1.0, 1.0, 1.0))
    brain = largest_component(head & ~(rim & (image <= BACKGROUND_LEVEL)))
    return ndimage.binary_fill_holes(brain)
