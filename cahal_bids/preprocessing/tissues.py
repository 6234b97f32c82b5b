"""Proxy CSF / grey-matter / white-matter labels of a 1 mm image by 3-class Atropos."""

from __future__ import annotations

import numpy as np

from cahal_bids.core.ants_bridge import ants_seed, private_tempdir
from cahal_bids.core.modalities import MODALITIES

__all__ = [
    'ATROPOS_CONVERGENCE',
    'ATROPOS_MRF',
    'CSF',
    'GM',
    'WM',
    'INTENSITY_ORDER',
    'LABELS',
    'kmeans_1d',
    'parenchyma',
    'tissue_labels',
]


LABELS: dict[int, str] = {0: 'background', 1: 'CSF', 2: 'GM', 3: 'WM'}
"""Values of ``labels.nii.gz``."""

CSF, GM, WM = 1, 2, 3

INTENSITY_ORDER: dict[str, tuple[int, int, int]] = {
    'T1w': (CSF, GM, WM),
    'FLAIR': (CSF, WM, GM),
    'T2w': (WM, GM, CSF),
}
"""Tissue label of the darkest, middle and brightest Atropos class, per modality."""

ATROPOS_MRF = '[0.1,1x1x1]'

ATROPOS_CONVERGENCE = '[5,0]'


def kmeans_1d(values: np.ndarray, classes: int = 3, iterations: int = 100) -> np.ndarray:
    """Sorted centres of a 1D k-means, started at evenly spaced percentiles (deterministic)."""
    centres = np.percentile(values, np.linspace(10, 90, classes))
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array(
            [
                values[nearest == k].mean() if np.any(nearest == k) else centres[k]
                for k in range(classes)
            ]
        )
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def parenchyma(image: np.ndarray, modality: str, centres: np.ndarray) -> np.ndarray:
    """Voxels whose intensity is nearer grey or white matter than CSF (and brighter than bone)."""
    order = INTENSITY_ORDER[modality]
    csf = order.index(CSF)
    if csf == 0:  # dark CSF (T1w, FLAIR)
        return image > 0.5 * (centres[0] + centres[1])
    # bright CSF (T2w): below halfway to CSF, above half the darkest tissue (skull, air)
    return (image < 0.5 * (centres[1] + centres[2])) & (image > 0.5 * centres[0])


def tissue_labels(
    image: np.ndarray, brain: np.ndarray, *, modality: str, seed: int = 0
) -> tuple[np.ndarray, dict[str, float]]:
    """Proxy labels (:data:`LABELS`) by 3-class Atropos inside ``brain``.

    The intensities are clipped to their 0.5-99.5th percentiles inside ``brain``
    (a few bright vessels otherwise capture a class of their own) and Atropos'
    k-means starts from the centres of a deterministic 1D k-means. Classes are
    ranked by mean intensity and named with :data:`INTENSITY_ORDER`. Returns the
    uint8 labels and the mean (unclipped) intensity of each tissue.
    """
    import ants

    if modality not in INTENSITY_ORDER:
        raise ValueError(f'modality must be one of {", ".join(MODALITIES)}, got {modality!r}')
    labels = np.zeros(image.shape, dtype=np.uint8)
    if brain.sum() < 27:
        return labels, {}
    values = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(values[brain], [0.5, 99.5])
    clipped = np.clip(values, low, high)
    samples = clipped[brain]
    centres = kmeans_1d(samples[:: max(1, samples.size // 500_000)])
    initial = 'x'.join(f'{centre:.6g}' for centre in centres)
    with ants_seed(seed), private_tempdir(prefix='cahal-atropos-'):
        result = ants.atropos(
            a=ants.from_numpy(clipped),
            x=ants.from_numpy(brain.astype(np.float32)),
            i=f'Kmeans[3,{initial}]',
            m=ATROPOS_MRF,
            c=ATROPOS_CONVERGENCE,
        )
    classes = np.rint(np.asarray(result['segmentation'].numpy())).astype(np.int64)
    found = [k for k in (1, 2, 3) if np.any((classes == k) & brain)]
    ranked = sorted(found, key=lambda k: float(clipped[(classes == k) & brain].mean()))
    means: dict[str, float] = {}
    for rank, atropos_class in enumerate(ranked):
        tissue = INTENSITY_ORDER[modality][rank + 3 - len(ranked)]
        voxels = (classes == atropos_class) & brain
        labels[voxels] = tissue
        means[LABELS[tissue]] = float(values[voxels].mean())
    return labels, means
