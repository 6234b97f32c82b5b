"""Lesion preservation: synthetic and real lesions, and what a restoration keeps of them.

A synthetic lesion is an ellipsoid (radii in millimetres) placed inside the brain, its
intensity set to the local background times ``1 + contrast`` (positive: hyperintense,
as MS lesions in FLAIR; negative: hypointense, as in T1w), with edges softened by a
0.5 mm Gaussian so that the ground truth itself is not aliased. After degradation and
restoration two numbers describe what is left of it, each relative to the ground truth:

- **contrast ratio**: (lesion mean - surrounding shell mean) / shell mean in the
  estimate, divided by the same in the ground truth (1 = fully kept, 0 = erased);
- **volume ratio**: voxels beyond the half-way threshold between lesion and background
  (inside a box around the lesion) in the estimate, divided by the same count in the
  ground truth (below 1: shrunk; above 1: grown).

Real lesions (:func:`find_real_lesions`) are hyperintense regions of a FLAIR ground
truth found by a fixed threshold: inside the brain mask eroded by 3 mm, voxels brighter
than the brain's median plus ``z`` (default 3) robust standard deviations (1.4826 times
the median absolute deviation), grouped into 26-connected components of at least
``min_voxels`` voxels. Each is then measured exactly as a synthetic one, with a shell
that leaves out every other candidate voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    'DEFAULT_LESIONS',
    'LESION_CELLS',
    'evaluate_lesions',
    'lesion_table',
    'LesionSpec',
    'RealLesion',
    'evaluate_real_lesions',
    'find_real_lesions',
    'insert_lesion',
    'lesion_measures',
    'place_lesion',
]

SHELL_MM = (2.0, 4.0)
"""The background shell: voxels between 2 and 4 mm from the lesion."""


@dataclass(frozen=True)
class LesionSpec:
    """One synthetic lesion: ellipsoid radii (mm) and relative contrast."""

    radii_mm: tuple[float, float, float]
    contrast: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_LESIONS = (
    LesionSpec((2.5, 2.5, 2.5), 0.6),
    LesionSpec((4.0, 4.0, 2.5), 0.6),
    LesionSpec((3.0, 3.0, 3.0), -0.4),
)
"""Small round and flat hyperintense lesions (the size of MS plaques), one hypointense."""


def _ellipsoid(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float]):
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing='ij')
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
    return distance <= 1.0


def place_lesion(brain_mask: np.ndarray, radii_mm: Sequence[float], rng: np.random.Generator):
    """A centre (voxel indices, 1 mm grid) deep enough in the brain for the whole lesion
    and its background shell."""
    margin = max(radii_mm) + SHELL_MM[1] + 1
    inside = ndimage.distance_transform_edt(brain_mask) > margin
    candidates = np.argwhere(inside)
    if len(candidates) == 0:
        raise ValueError('the brain mask has no room for the lesion and its shell')
    return tuple(int(v) for v in candidates[rng.integers(len(candidates))])


def insert_lesion(
    truth: np.ndarray, centre: Sequence[int], spec: LesionSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The truth with the lesion, the lesion mask, and the background shell mask."""
    mask = _ellipsoid(truth.shape, centre, spec.radii_mm)
    distance = ndimage.distance_transform_edt(~mask)
    shell = (distance > SHELL_MM[0]) & (distance <= SHELL_MM[1])
    background = float(np.mean(truth[shell]))
    weight = ndimage.gaussian_filter(mask.astype(np.float32), 0.5)
    lesioned = truth + weight * (background * spec.contrast)
    return lesioned.astype(np.float32), mask, shell


def _contrast(image: np.ndarray, mask: np.ndarray, shell: np.ndarray) -> float:
    background = float(np.mean(image[shell]))
    return (float(np.mean(image[mask])) - background) / background


def lesion_measures(
    estimate: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    shell: np.ndarray,
) -> dict[str, float]:
    """Contrast and thresholded-volume ratios of ``estimate`` against ``truth``."""
    truth_contrast = _contrast(truth, mask, shell)
    background = float(np.mean(truth[shell]))
    threshold = background * (1 + truth_contrast / 2)
    region = ndimage.binary_dilation(mask, iterations=int(SHELL_MM[0]))
    sign = 1.0 if truth_contrast > 0 else -1.0

    def volume(image: np.ndarray) -> int:
        return int(np.count_nonzero(sign * (image[region] - threshold) > 0))

    reference_volume = volume(truth)
    return {
        'contrast_ratio': _contrast(estimate, mask, shell) / truth_contrast,
        'volume_ratio': volume(estimate) / reference_volume if reference_volume else float('nan'),
        'truth_voxels': float(reference_volume),
    }


LESION_CELLS = ('V3A1', 'V3A2', 'V4A1', 'V5A1', 'V6A1')
"""The thick-slice cells of clinical 2D acquisitions, where lesions are most at risk."""
CROP = 64
"""Edge of the cube around each lesion that is degraded and restored (voxels, 1 mm)."""


def evaluate_lesions(
    truth: np.ndarray,
    brain_mask: np.ndarray,
    *,
    subject: str,
    methods: dict[str, Any],
    lesions: Sequence[LesionSpec] = DEFAULT_LESIONS,
    cells: Sequence[str] = LESION_CELLS,
    placements: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Insert each lesion (at ``placements`` random places), simulate each cell's
    acquisition around it, and measure each method.

    ``methods`` maps a name to ``f(low, low_affine, resolution, shape) -> estimate`` (the
    evaluation's methods). Work happens on a ``CROP``-voxel cube around the lesion.
    """
    from cahal_bids.evaluation.protocol import acquire
    from cahal_bids.physics.acquisition import sample_in_cell

    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    half = CROP // 2
    padded = np.pad(truth, half, mode='constant')
    padded_mask = np.pad(brain_mask.astype(bool), half, mode='constant')
    trials = [(index, spec) for index, spec in enumerate(lesions) for _ in range(placements)]
    for lesion_index, spec in trials:
        centre = place_lesion(padded_mask, spec.radii_mm, rng)
        box = tuple(slice(c - half, c + half) for c in centre)
        crop = np.ascontiguousarray(padded[box], dtype=np.float32)
        lesioned, mask, shell = insert_lesion(crop, (half, half, half), spec)
        for cell in cells:
            resolution = sample_in_cell(cell, rng)
            low, low_affine = acquire(lesioned, np.eye(4), resolution)
            for name, method in methods.items():
                estimate = method(low, low_affine, resolution, lesioned.shape)
                rows.append(
                    {
                        'subject': subject,
                        'lesion': lesion_index,
                        **spec.as_dict(),
                        'centre': [c - half for c in centre],
                        'cell': cell,
                        'resolution': [round(r, 4) for r in resolution],
                        'method': name,
                        **lesion_measures(estimate, lesioned, mask, shell),
                    }
                )
    return rows


def lesion_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: mean contrast and volume ratios per method and cell (1.00 = as in truth)."""
    cells = list(dict.fromkeys(row['cell'] for row in rows))
    methods = list(dict.fromkeys(row['method'] for row in rows))
    lines = [
        '| method | ' + ' | '.join(f'{cell} contrast / volume' for cell in cells) + ' |',
        '| --- |' + ' ---: |' * len(cells),
    ]
    for method in methods:
        cells_text = []
        for cell in cells:
            chosen = [r for r in rows if r['method'] == method and r['cell'] == cell]
            contrast = np.mean([r['contrast_ratio'] for r in chosen])
            volume = np.nanmean([r['volume_ratio'] for r in chosen])
            cells_text.append(f'{contrast:.2f} / {volume:.2f}')
        lines.append(f'| {method} | ' + ' | '.join(cells_text) + ' |')
    return '\n'.join(lines) + '\n'


@dataclass(frozen=True)
class RealLesion:
    """One thresholded lesion of a ground truth: its voxels and its background shell."""

    index: int
    voxels: int
    centre: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    mask: np.ndarray
    shell: np.ndarray


def find_real_lesions(
    truth: np.ndarray,
    brain_mask: np.ndarray,
    *,
    z: float = 3.0,
    min_voxels: int = 20,
    max_lesions: int = 8,
    margin: int = 16,
) -> list[RealLesion]:
    """The ``max_lesions`` largest hyperintense components of ``truth`` (see module notes).

    Each comes with a crop box (the component's bounding box grown by ``margin``
    voxels, clipped to the image) and its mask and shell within that box.
    """
    brain = ndimage.binary_erosion(brain_mask.astype(bool), iterations=3)
    if not brain.any():
        return []
    values = truth[brain].astype(np.float64)
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    if spread <= 0:
        return []
    candidates = brain & (truth > median + z * spread)
    labels, count = ndimage.label(candidates, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = [int(i) + 1 for i in np.argsort(sizes, kind='stable')[::-1] if sizes[i] >= min_voxels]
    boxes = ndimage.find_objects(labels)
    lesions: list[RealLesion] = []
    for rank, label in enumerate(order[:max_lesions]):
        found = boxes[label - 1]
        box = tuple(
            slice(max(part.start - margin, 0), min(part.stop + margin, n))
            for part, n in zip(found, truth.shape, strict=True)
        )
        mask = labels[box] == label
        distance = ndimage.distance_transform_edt(~mask)
        shell = (
            (distance > SHELL_MM[0]) & (distance <= SHELL_MM[1]) & brain[box] & ~candidates[box]
        )
        if not shell.any():
            continue
        centre = tuple(
            int(round(c + part.start))
            for c, part in zip(ndimage.center_of_mass(mask), box, strict=True)
        )
        lesions.append(
            RealLesion(
                index=rank,
                voxels=int(mask.sum()),
                centre=centre,  # type: ignore[arg-type]
                box=box,  # type: ignore[arg-type]
                mask=mask,
                shell=shell,
            )
        )
    return lesions


def evaluate_real_lesions(
    truth: np.ndarray,
    brain_mask: np.ndarray,
    *,
    subject: str,
    methods: dict[str, Any],
    cells: Sequence[str] = LESION_CELLS,
    seed: int = 0,
    **find_options: Any,
) -> list[dict[str, Any]]:
    """Simulate each cell's acquisition around each real lesion and measure each method.

    Rows have the same measures as :func:`evaluate_lesions`, with ``lesion`` the rank of
    the component by size and ``truth_voxels`` its thresholded volume.
    """
    from cahal_bids.evaluation.protocol import acquire
    from cahal_bids.physics.acquisition import sample_in_cell

    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for lesion in find_real_lesions(truth, brain_mask, **find_options):
        crop = np.ascontiguousarray(truth[lesion.box], dtype=np.float32)
        for cell in cells:
            resolution = sample_in_cell(cell, rng)
            low, low_affine = acquire(crop, np.eye(4), resolution)
            for name, method in methods.items():
                estimate = method(low, low_affine, resolution, crop.shape)
                rows.append(
                    {
                        'subject': subject,
                        'lesion': lesion.index,
                        'lesion_voxels': lesion.voxels,
                        'centre': list(lesion.centre),
                        'cell': cell,
                        'resolution': [round(r, 4) for r in resolution],
                        'method': name,
                        **lesion_measures(estimate, crop, lesion.mask, lesion.shell),
                    }
                )
    return rows
