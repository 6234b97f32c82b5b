"""How far to trust a registration to a template: similarity inside the template's brain.

The measure is the normalised mutual information (Studholme's
``(H(A) + H(B)) / H(A, B)``: 1 for independent images, 2 for identical ones, here with
:data:`QUALITY_BINS` bins) between the template and the registered image, inside the
template's brain mask grown by :data:`QUALITY_MARGIN_MM` (the brain and its edge: the
registration's own metric mask) and where the image's field of view reaches
(:func:`registration_quality`). Correlation with the whole template (the app's former
figure) mixes in the scalp, neck and background, which a skull-stripped or thick-slice
image does not have; mutual information in the brain compares what every input has, in
any contrast, and the brain's edge is where a misregistration shows most. A registration
is flagged doubtful below :data:`QUALITY_THRESHOLDS` for its contrast, or when less than
:data:`MIN_BRAIN_COVERAGE` of the template's brain is in the field of view.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from cahal_bids.core.ants_bridge import ants_image

if TYPE_CHECKING:
    from cahal_bids.preprocessing.brain_template import TemplateBrain

__all__ = [
    'MIN_BRAIN_COVERAGE',
    'QUALITY_BINS',
    'QUALITY_MARGIN_MM',
    'QUALITY_THRESHOLDS',
    'brain_mask_in_image',
    'normalized_mutual_information',
    'read_ants',
    'registration_quality',
]

QUALITY_THRESHOLDS: dict[str, float] = {'T1w': 1.0424, 'T2w': 1.0424, 'FLAIR': 1.0424}
"""NMI (:func:`registration_quality`) below which a registration is doubtful, per contrast.

Calibrated on the validation split (``docs/evaluation.md`` has the table): each image
(sub-stroke01 T1w, T2w and FLAIR, skull-stripped; sub-philips01 T1w and sub-arc2265 T2w,
full head and two skull-stripped versions of each) was registered as ``cahal-bids``
does, then the measure was computed at its registration and at deliberate
misregistrations (shifts of 1-25 mm, tilts of 2-20 degrees about two axes, scalings of
0.92 and 1.1 about the brain's centre), each with its TRE against the registration.
Every registration within 2 mm scored at least 1.0461 (the full-head T2w, tilted by 2
degrees: 1.4 mm), every one off by 8 mm or more at most 1.0388 (a skull-stripped T1w
tilted 20 degrees); the threshold is the midpoint (calibrated again when full-head images
began to be registered brain to brain; it was 1.043 with the whole-head fit). Between 5
and 8 mm the two overlap, so the flag means "probably off by several millimetres or
more". A full-head T2w registration
that failed by 14 mm scored 1.0296; restored thick-slice estimates score as high as the
1 mm images (1.077-1.082 for sub-philips01's A1 cells). One value serves every
contrast: the lowest good figure was a T2w, the highest bad one a T1w.
"""

QUALITY_MARGIN_MM = 5.0
"""Growth (mm) of the template's brain mask for the quality measure (its edge included)."""

QUALITY_BINS = 16
"""Histogram bins of each image for the quality measure's NMI."""

MIN_BRAIN_COVERAGE = 0.5
"""Fraction of the template's brain that the registered field of view must cover."""


def read_ants(path: str | os.PathLike[str]) -> Any:
    """The float32 image at ``path`` as an ANTs image (trailing unit axes dropped)."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    return ants_image(data, image.affine)


def normalized_mutual_information(
    first: np.ndarray, second: np.ndarray, *, bins: int = 32
) -> float:
    """Studholme's NMI ``(H(A) + H(B)) / H(A, B)`` of paired samples (1 to 2).

    Each variable is clipped to its 0.5-99.5th percentiles and binned in ``bins``
    equal bins.

    >>> x = np.linspace(0, 1, 1000)
    >>> round(normalized_mutual_information(x, x), 3)
    2.0
    >>> round(normalized_mutual_information(x, 1 - x), 3)  # reversed contrast: as informative
    2.0
    >>> 1.0 < normalized_mutual_information(x, np.random.default_rng(0).random(1000)) < 1.2
    True
    """
    a = np.asarray(first, dtype=np.float64).ravel()
    b = np.asarray(second, dtype=np.float64).ravel()
    if a.size != b.size or a.size < 2:
        raise ValueError(f'need two samples of the same size, got {a.size} and {b.size}')

    def binned(values: np.ndarray) -> np.ndarray:
        low, high = np.percentile(values, [0.5, 99.5])
        if high <= low:
            return np.zeros(values.shape, dtype=np.int64)
        scaled = (np.clip(values, low, high) - low) / (high - low)
        return np.minimum((scaled * bins).astype(np.int64), bins - 1)

    joint = np.bincount(binned(a) * bins + binned(b), minlength=bins * bins).astype(np.float64)
    joint /= joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    table = joint.reshape(bins, bins)
    h_joint = entropy(joint)
    if h_joint == 0:
        return 2.0
    return (entropy(table.sum(axis=1)) + entropy(table.sum(axis=0))) / h_joint


def _volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The 3D float32 data and affine of the image at ``path`` (trailing unit axes dropped)."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    return data, np.asarray(image.affine, dtype=np.float64)


def _sample(
    data: np.ndarray, coordinates: np.ndarray, *, margin: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of ``data`` at voxel ``coordinates`` (N x 3), and which lie inside.

    scipy rather than ITK's resampler: ITK's results change in the last digits with
    the number of threads, and the app's outputs must not (same seed, same bytes).
    """
    from scipy.ndimage import map_coordinates

    upper = np.asarray(data.shape, dtype=np.float64) - 1
    inside = np.all((coordinates >= -margin) & (coordinates <= upper + margin), axis=1)
    values = map_coordinates(
        data, np.clip(coordinates, 0, upper).T, order=1, mode='nearest', prefilter=False
    )
    return values, inside


def registration_quality(
    moving: str | os.PathLike[str],
    template: TemplateBrain,
    transform: str | os.PathLike[str],
    *,
    modality: str,
) -> dict[str, Any]:
    """How well ``moving`` sits on ``template`` through ``transform`` (image -> template).

    The image is sampled (linear) at the voxels of the template's brain mask grown by
    :data:`QUALITY_MARGIN_MM`; where the image's field of view reaches them, the
    normalised mutual information (:func:`normalized_mutual_information`,
    :data:`QUALITY_BINS` bins) and the correlation with the template are computed;
    ``brain_coverage`` is the fraction of the (ungrown) brain mask in the field of view.
    ``doubtful`` is True when the NMI is below the contrast's :data:`QUALITY_THRESHOLDS`
    entry or the brain is less than :data:`MIN_BRAIN_COVERAGE` covered. The result does
    not depend on thread counts.
    """
    from cahal_bids.preprocessing.masks import dilate
    from cahal_bids.preprocessing.transforms import moving_voxel_coordinates, read_itk_affine

    head, template_affine = _volume(template.head)
    brain_data, _ = _volume(template.brain_mask)
    brain = brain_data > 0
    spacing = tuple(float(v) for v in np.linalg.norm(template_affine[:3, :3], axis=0))
    mask = dilate(brain, QUALITY_MARGIN_MM, spacing)
    image, image_affine = _volume(moving)
    voxels = np.argwhere(mask)
    points = voxels.astype(np.float64) @ template_affine[:3, :3].T + template_affine[:3, 3]
    coordinates = moving_voxel_coordinates(points, read_itk_affine(transform), image_affine)
    sampled, reached = _sample(image, coordinates)
    in_brain = brain[mask]
    coverage = float((reached & in_brain).sum()) / max(int(brain.sum()), 1)
    threshold = QUALITY_THRESHOLDS.get(modality, min(QUALITY_THRESHOLDS.values()))
    if reached.sum() < 1000:
        return {
            'metric': 'nmi_brain',
            'nmi_brain': float('nan'),
            'correlation_brain': float('nan'),
            'brain_coverage': round(coverage, 4),
            'threshold': threshold,
            'doubtful': True,
        }
    template_values = head[mask][reached]
    image_values = sampled[reached]
    nmi = normalized_mutual_information(template_values, image_values, bins=QUALITY_BINS)
    correlation = float(np.corrcoef(template_values, image_values)[0, 1])
    return {
        'metric': 'nmi_brain',
        'nmi_brain': round(nmi, 5),
        'correlation_brain': round(correlation, 5),
        'brain_coverage': round(coverage, 4),
        'threshold': threshold,
        'doubtful': bool(nmi < threshold or coverage < MIN_BRAIN_COVERAGE),
    }


def brain_mask_in_image(
    moving: str | os.PathLike[str],
    template_mask: str | os.PathLike[str],
    transform: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray]:
    """A template's brain mask on the grid of ``moving`` (uint8 0/1) and that grid's affine.

    ``transform`` takes the image to the template (forward, ITK convention); its
    inverse carries the mask back (linear interpolation, kept at >= 1/2), one slab
    of the image's grid at a time to bound memory.
    """
    from cahal_bids.preprocessing.transforms import moving_voxel_coordinates, read_itk_affine

    image, image_affine = _volume(moving)
    mask_data, mask_affine = _volume(template_mask)
    inverse = np.linalg.inv(read_itk_affine(transform))
    result = np.zeros(image.shape, dtype=np.uint8)
    i, j = np.meshgrid(
        np.arange(image.shape[0], dtype=np.float64),
        np.arange(image.shape[1], dtype=np.float64),
        indexing='ij',
    )
    for k in range(image.shape[2]):
        voxels = np.stack([i.ravel(), j.ravel(), np.full(i.size, float(k))], axis=1)
        points = voxels @ image_affine[:3, :3].T + image_affine[:3, 3]
        coordinates = moving_voxel_coordinates(points, inverse, mask_affine)
        values, inside = _sample(mask_data, coordinates)
        result[:, :, k] = ((values >= 0.5) & inside).reshape(i.shape)
    return result, image_affine
