"""Ground-truth preparation: high-resolution images to cached, labelled 1 mm training targets.

:func:`prepare_image` turns one high-resolution MRI into the training target the
experts learn to reconstruct, with masks and proxy tissue labels, and caches the
result in ``cache_dir/<source stem>/``:

``image.nii.gz``
    float32, 1 mm, RAS voxel order, divided by its
    :class:`~cahal_bids.core.normalization.RobustScale`
    (:data:`~cahal_bids.core.normalization.DEFAULT_NORMALIZATION`, the normalisation
    inference uses).
``head_mask.nii.gz``, ``brain_mask.nii.gz``
    uint8 0/1 on the same grid.
``labels.nii.gz``
    uint8 proxy tissue labels: 0 background, 1 CSF, 2 grey matter, 3 white matter
    (:data:`LABELS`), non-zero only inside the brain mask.
``prepared.json``
    provenance: source path and sha256, parameters, normalisation scale,
    brain-extraction decision and evidence, label volumes (mL), timings and
    software versions. It is written last, so its presence marks a complete entry.

The steps, in order:

1. **Load and validate** with :func:`~cahal_bids.core.nifti.load_image`.
2. **Head mask** on the source grid (:func:`estimate_head_mask`): Gaussian
   smoothing (sigma 1 mm), threshold at ``head_fraction`` (5 %) of the image's
   99.9th percentile (the convention of :func:`~cahal_bids.core.normalization.head_mask`),
   largest 6-connected component, morphological closing with a 3 mm ball, 3D hole
   filling.
3. **Denoising** (optional) with ANTs' adaptive non-local means filter
   (Manjon et al. 2010; ``ants.denoise_image``, Rician noise model) restricted to
   the head mask; voxels outside the mask keep their values.
4. **Resampling** to the native 1 mm grid of :func:`~cahal_bids.core.grid.native_grid`
   (the inference output contract: same voxel axes and field-of-view corner,
   ``round(n * r)`` voxels) by cubic B-spline interpolation
   (``scipy.ndimage.affine_transform``, order 3, spline prefilter, exact index
   mapping ``i_src = (i_out + 1/2) / r - 1/2``). Axes finer than 1 mm are first
   low-pass filtered so that they are not aliased: a Gaussian of
   ``sigma = sqrt(1 mm^2 - r^2) / (2 sqrt(2 ln 2))`` (the blur that brings a voxel
   of FWHM ``r`` to a FWHM of 1 mm; 0.32 mm for ``r = 0.67 mm``), see
   :func:`antialias_sigmas`. Negative B-spline overshoot is clipped at 0. The head
   mask follows by linear interpolation thresholded at 1/2.
5. **Reorientation** to RAS voxel order, lossless
   (:class:`~cahal_bids.core.orientation.Reorientation`).
6. **Normalisation** with :class:`~cahal_bids.core.normalization.RobustScale`.
7. **Brain mask.** Skull-stripped inputs are recognised automatically
   (:func:`looks_brain_extracted`: at least 95 % of the voxels more than 2 mm
   outside the head mask are zero *and* the head mask is at most 2.3 L, the size
   of a brain but not of a head) or declared with ``brain_extracted``; their brain
   mask is the head mask less the voxels of its outer 2 mm darker than 5 % of the
   normalised scale (the rim that the mask's smoothing adds;
   :func:`stripped_brain_mask`).
   Full-head scans get :func:`template_brain_mask`: the full-head
   MNI152NLin2009cAsym T1w template (TemplateFlow) is registered to the image's
   N4-corrected copy (step 8) affinely (``ants.registration``, ``AffineFast``);
   the MNI152NLin2009aSym brain mask shipped with nilearn (same MNI world space) is
   carried along as a prior; the prior is refined by intensity: within the prior
   dilated by 5 mm, the voxels brighter (T2w: darker) than halfway between the
   CSF and parenchyma intensity (1D k-means of the prior's core), opened with a
   2 mm ball, largest component, closed with a 5 mm ball (sulci, fissures), holes
   filled.
8. **Proxy tissue labels** with ``ants.atropos`` (k-means initialisation from
   a deterministic 1D k-means, 3 classes, MRF smoothing 0.1 with a 1-voxel radius,
   5 iterations; :func:`tissue_labels`) inside the brain mask, on an N4
   bias-field-corrected copy of the normalised image clipped to its 0.5-99.5th
   percentiles (the corrected
   copy is used for the brain mask and the labels only, never stored). Atropos
   numbers classes by increasing mean intensity; :data:`INTENSITY_ORDER` maps them
   to tissues per modality (T1w: CSF < GM < WM; FLAIR: CSF < WM < GM;
   T2w: WM < GM < CSF).

**Reproducibility.** ``seed + 1`` (ANTs wants a non-zero seed) is passed to ANTs
as ``ANTS_RANDOM_SEED`` for the duration of each ANTs call; the intensity
k-means of the brain mask is deterministic. ANTs' multi-threaded denoising, N4 and Atropos are not
bit-reproducible from run to run (thread scheduling changes the results
slightly); they are when ITK runs one thread, which is decided by the
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` environment variable *before the first
ANTs call of the process* (``cahal-train prepare --threads 1`` sets it). The value
in effect is recorded in ``prepared.json``.

**Cache.** A second call with a source of the same sha256 and the same
parameters (:attr:`PreparationParameters.as_dict`, including
:data:`PREPARATION_VERSION`) returns the cached :class:`PreparedVolume` without
recomputation; anything else recomputes and overwrites the entry.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from cahal_bids import __version__
from cahal_bids.core.ants_bridge import ants_image, ants_seed
from cahal_bids.core.atomic import write_json_atomic
from cahal_bids.core.errors import CahalError, InvalidImageError
from cahal_bids.core.grid import NativeGrid, native_grid
from cahal_bids.core.nifti import NIFTI_SUFFIXES, load_header, load_image, save_image
from cahal_bids.core.normalization import DEFAULT_NORMALIZATION, RobustScale
from cahal_bids.core.orientation import Reorientation
from cahal_bids.engine.zoo import file_sha256

__all__ = [
    'BRAIN_EXTRACTED_MAX_LITRES',
    'INTENSITY_ORDER',
    'LABELS',
    'MANIFEST_NAME',
    'METADATA_NAME',
    'MODALITIES',
    'PREPARATION_VERSION',
    'BrainTemplate',
    'PreparationError',
    'PreparationParameters',
    'PreparedVolume',
    'antialias_sigmas',
    'bias_corrected',
    'default_brain_template',
    'nlm_denoise',
    'estimate_head_mask',
    'find_images',
    'looks_brain_extracted',
    'prepare_dataset',
    'prepare_image',
    'resample_to_native_bspline',
    'stripped_brain_mask',
    'template_brain_mask',
    'tissue_labels',
    'write_manifest',
]

PREPARATION_VERSION = 1
"""Version of the preparation recipe; part of the cache key, bump it when the output changes."""

MODALITIES: tuple[str, ...] = ('T1w', 'FLAIR', 'T2w')
"""Modalities (BIDS suffixes) that can be prepared."""

LABELS: dict[int, str] = {0: 'background', 1: 'CSF', 2: 'GM', 3: 'WM'}
"""Values of ``labels.nii.gz``."""

CSF, GM, WM = 1, 2, 3

INTENSITY_ORDER: dict[str, tuple[int, int, int]] = {
    'T1w': (CSF, GM, WM),
    'FLAIR': (CSF, WM, GM),
    'T2w': (WM, GM, CSF),
}
"""Tissue label of the darkest, middle and brightest Atropos class, per modality."""

BRAIN_EXTRACTED_MAX_LITRES = 2.3
"""A head mask larger than this is a head, not a skull-stripped brain."""

BRAIN_EXTRACTED_ZERO_FRACTION = 0.95
"""Fraction of zero voxels, beyond 2 mm outside the head mask, of a skull-stripped image."""

BACKGROUND_LEVEL = float(DEFAULT_NORMALIZATION['head_fraction'])
"""Normalised intensity at or below which a voxel of a skull-stripped image is background."""

RIM_MM = 2.0
"""Depth of the head mask's outer rim searched for background (skull-stripped inputs)."""

PLAUSIBLE_BRAIN_LITRES = (0.8, 2.0)
"""Brain-mask volumes outside this range are recorded as warnings."""

METADATA_NAME = 'prepared.json'
MANIFEST_NAME = 'manifest.json'
OUTPUT_FILES: dict[str, str] = {
    'image': 'image.nii.gz',
    'head_mask': 'head_mask.nii.gz',
    'brain_mask': 'brain_mask.nii.gz',
    'labels': 'labels.nii.gz',
}

SPACING = 1.0
"""Output voxel size (mm)."""
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

# Morphology and intensity parameters (millimetres), documented in the module docstring.
HEAD_SMOOTHING_MM = 1.0
HEAD_CLOSING_MM = 3.0
OUTSIDE_MARGIN_MM = 2.0
PRIOR_GROWTH_MM = 5.0
PRIOR_CORE_MM = 3.0
BRAIN_OPENING_MM = 2.0
BRAIN_CLOSING_MM = 5.0
ATROPOS_MRF = '[0.1,1x1x1]'
ATROPOS_CONVERGENCE = '[5,0]'
N4_SHRINK_FACTOR = 4


class PreparationError(CahalError):
    """Preparation cannot proceed (missing template, invalid arguments, bad dataset)."""


# --- parameters and results ---------------------------------------------------------------


@dataclass(frozen=True)
class PreparationParameters:
    """Everything that changes the prepared output: the cache key (with the source sha256)."""

    modality: str
    denoise: bool = True
    shrink_factor: int = 1
    brain_extracted: bool | None = None
    seed: int = 0
    template: str | None = None
    """Name of the brain template used for full-head images (None: the default one)."""

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(
                f'modality must be one of {", ".join(MODALITIES)}, got {self.modality!r}'
            )
        if isinstance(self.shrink_factor, bool) or int(self.shrink_factor) != self.shrink_factor:
            raise ValueError(f'shrink_factor must be an integer >= 1, got {self.shrink_factor!r}')
        if self.shrink_factor < 1:
            raise ValueError(f'shrink_factor must be an integer >= 1, got {self.shrink_factor!r}')
        if self.brain_extracted not in (None, True, False):
            raise ValueError(
                f'brain_extracted must be None, True or False, got {self.brain_extracted!r}'
            )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready parameters, including the fixed recipe settings and its version."""
        return {
            'preparation_version': PREPARATION_VERSION,
            'modality': self.modality,
            'denoise': bool(self.denoise),
            'shrink_factor': int(self.shrink_factor),
            'brain_extracted': self.brain_extracted,
            'seed': int(self.seed),
            'template': self.template,
            'spacing_mm': SPACING,
            'normalization': dict(DEFAULT_NORMALIZATION),
            'denoiser': {'function': 'ants.denoise_image', 'noise_model': 'Rician'},
            'interpolation': 'cubic B-spline (scipy.ndimage.affine_transform, order 3)',
            'labels': {
                'function': 'ants.atropos',
                'init': 'Kmeans[3, 1D k-means centres]',
                'clip_percentiles': [0.5, 99.5],
                'mrf': ATROPOS_MRF,
                'convergence': ATROPOS_CONVERGENCE,
                'bias_correction': 'ants.n4_bias_field_correction',
                'bias_shrink_factor': N4_SHRINK_FACTOR,
            },
        }


def _read_array(path: Path) -> np.ndarray:
    image = nib.load(path)
    if not isinstance(image, nib.Nifti1Image):
        raise InvalidImageError(path, 'not a NIfTI image')
    return np.asarray(image.dataobj)


@dataclass(frozen=True, eq=False)
class PreparedVolume:
    """A prepared ground-truth entry in the cache; arrays are read from disk on each call."""

    directory: Path
    metadata: Mapping[str, Any] = field(repr=False)
    from_cache: bool = False
    """Whether :func:`prepare_image` found this entry in the cache (nothing recomputed)."""

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> PreparedVolume:
        """Read a cache entry written by :func:`prepare_image`."""
        folder = Path(directory)
        metadata = _read_metadata(folder)
        if metadata is None:
            raise PreparationError(f'{folder}: no readable {METADATA_NAME}, not a prepared entry')
        return cls(directory=folder, metadata=metadata)

    @property
    def source(self) -> Path:
        """The high-resolution image this entry was prepared from."""
        return Path(self.metadata['source'])

    @property
    def modality(self) -> str:
        return str(self.metadata['parameters']['modality'])

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world matrix of every stored image (1 mm, RAS voxel order)."""
        return np.asarray(self.metadata['grid']['affine'], dtype=np.float64)

    @property
    def scale(self) -> float:
        """The normalisation scale: stored image times ``scale`` gives the denoised intensities."""
        return float(self.metadata['normalization']['scale'])

    @property
    def image_path(self) -> Path:
        return self.directory / OUTPUT_FILES['image']

    @property
    def head_mask_path(self) -> Path:
        return self.directory / OUTPUT_FILES['head_mask']

    @property
    def brain_mask_path(self) -> Path:
        return self.directory / OUTPUT_FILES['brain_mask']

    @property
    def labels_path(self) -> Path:
        return self.directory / OUTPUT_FILES['labels']

    @property
    def metadata_path(self) -> Path:
        return self.directory / METADATA_NAME

    def image(self) -> np.ndarray:
        """The normalised 1 mm RAS image, float32."""
        return _read_array(self.image_path).astype(np.float32, copy=False)

    def labels(self) -> np.ndarray:
        """Tissue labels (:data:`LABELS`), uint8."""
        return _read_array(self.labels_path).astype(np.uint8, copy=False)

    def head_mask(self) -> np.ndarray:
        """Head mask, bool."""
        return _read_array(self.head_mask_path) > 0

    def brain_mask(self) -> np.ndarray:
        """Brain mask, bool."""
        return _read_array(self.brain_mask_path) > 0


@dataclass(frozen=True, eq=False)
class BrainTemplate:
    """What full-head brain extraction registers to the image.

    ``head`` is a full-head T1w image; ``brain_mask`` a brain mask (non-zero inside)
    in the same world space, on any grid.
    """

    head: Path
    brain_mask: nib.Nifti1Image
    name: str


def default_brain_template() -> BrainTemplate:
    """TemplateFlow's MNI152NLin2009cAsym 1 mm T1w head with nilearn's MNI152NLin2009aSym mask.

    The head comes from TemplateFlow (``TEMPLATEFLOW_HOME``, read by TemplateFlow);
    the brain mask is ``nilearn.datasets.load_mni152_brain_mask(resolution=1)``,
    the thresholded brain-extracted ICBM 2009a symmetric template that nilearn
    ships. Both templates live in the same MNI world space and differ by a millimetre
    or two at the brain's edge, which the intensity refinement of
    :func:`template_brain_mask` absorbs.
    """
    try:
        from templateflow import api as templateflow
    except ImportError as exc:  # pragma: no cover - templateflow is a dependency
        raise PreparationError(f'templateflow is needed for full-head images ({exc})') from None
    try:
        head = Path(
            str(templateflow.get('MNI152NLin2009cAsym', resolution=1, desc=None, suffix='T1w'))
        )
    except Exception as exc:  # noqa: BLE001 - templateflow raises network and lookup errors
        raise PreparationError(
            'cannot get the MNI152NLin2009cAsym 1 mm T1w template from TemplateFlow '
            f'({type(exc).__name__}: {exc}); point TEMPLATEFLOW_HOME at a folder holding '
            'tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz'
        ) from None
    if not head.is_file() or head.stat().st_size == 0:
        raise PreparationError(f'{head}: TemplateFlow template file is missing or empty')
    try:
        from nilearn.datasets import load_mni152_brain_mask
    except ImportError as exc:
        raise PreparationError(
            f'nilearn is needed for the brain mask of full-head images ({exc}); '
            'install nilearn or pass brain_extracted=True for skull-stripped images'
        ) from None
    mask = load_mni152_brain_mask(resolution=1)
    brain_mask = nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.float32), mask.affine)
    brain_mask.header.set_xyzt_units(xyz='mm', t='sec')
    return BrainTemplate(
        head=head,
        brain_mask=brain_mask,
        name='MNI152NLin2009cAsym T1w (TemplateFlow) + MNI152NLin2009aSym brain mask (nilearn)',
    )


# --- morphology ---------------------------------------------------------------------------


def _sampling(voxel_sizes: Sequence[float] | None) -> tuple[float, float, float]:
    if voxel_sizes is None:
        return (1.0, 1.0, 1.0)
    return (float(voxel_sizes[0]), float(voxel_sizes[1]), float(voxel_sizes[2]))


def _dilate(mask: np.ndarray, radius: float, sampling: Sequence[float]) -> np.ndarray:
    """Dilation by a ball of ``radius`` mm (exact, via the Euclidean distance transform)."""
    if mask.all() or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=sampling) <= radius


def _erode(mask: np.ndarray, radius: float, sampling: Sequence[float]) -> np.ndarray:
    """Erosion by a ball of ``radius`` mm; outside the field of view counts as background."""
    if not mask.any():
        return mask.copy()
    padded = np.pad(mask, 1)
    distance = ndimage.distance_transform_edt(padded, sampling=sampling)
    return distance[1:-1, 1:-1, 1:-1] > radius


def _close(mask: np.ndarray, radius: float, sampling: Sequence[float]) -> np.ndarray:
    """Closing by a ball of ``radius`` mm, padded so that the field of view edge does not erode."""
    pad = [int(math.ceil(radius / size)) + 1 for size in sampling]
    padded = np.pad(mask, [(p, p) for p in pad])
    closed = _erode(_dilate(padded, radius, sampling), radius, sampling)
    return closed[pad[0] : -pad[0], pad[1] : -pad[1], pad[2] : -pad[2]] | mask


def _open(mask: np.ndarray, radius: float, sampling: Sequence[float]) -> np.ndarray:
    return _dilate(_erode(mask, radius, sampling), radius, sampling) & mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _bounding_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, slice, slice]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (clipped)."""
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        start = max(int(hits[0]) - margin[axis], 0)
        stop = min(int(hits[-1]) + margin[axis] + 1, mask.shape[axis])
        slices.append(slice(start, stop))
    return slices[0], slices[1], slices[2]


# --- steps --------------------------------------------------------------------------------


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
    mask = _largest_component(smooth > head_fraction * reference)
    if not mask.any():
        return mask
    mask = _close(mask, HEAD_CLOSING_MM, sampling)
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
    outside = ~_dilate(head, OUTSIDE_MARGIN_MM, sampling)
    reference = float(np.percentile(array, 99.9))
    if outside.any() and reference > 0:
        zero_fraction = float(np.mean(np.abs(array[outside]) <= 1e-3 * reference))
    else:
        zero_fraction = 0.0
    decision = zero_fraction >= BRAIN_EXTRACTED_ZERO_FRACTION and (
        litres <= BRAIN_EXTRACTED_MAX_LITRES
    )
    return bool(decision), {'head_litres': litres, 'outside_zero_fraction': zero_fraction}


def antialias_sigmas(
    voxel_sizes: Sequence[float], spacing: float = SPACING
) -> tuple[float, float, float]:
    """Gaussian sigma (in input voxels) applied along each axis before resampling.

    Zero along axes at least as coarse as ``spacing``; elsewhere the blur that
    takes a voxel of FWHM ``r`` to a FWHM of ``spacing``:
    ``sqrt(spacing**2 - r**2) / (2 sqrt(2 ln 2)) / r`` voxels.

    >>> [round(s, 3) for s in antialias_sigmas((0.7, 1.0, 2.0))]
    [0.433, 0.0, 0.0]
    """
    sigmas = []
    for size in voxel_sizes:
        r = float(size)
        if r >= spacing * (1 - 1e-3):
            sigmas.append(0.0)
        else:
            sigmas.append(math.sqrt(spacing**2 - r**2) / FWHM_PER_SIGMA / r)
    return sigmas[0], sigmas[1], sigmas[2]


def _index_mapping(affine: np.ndarray, grid: NativeGrid) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset taking output voxel indices to source voxel indices."""
    mapping = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ grid.affine
    return mapping[:3, :3], mapping[:3, 3]


def resample_to_native_bspline(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    spacing: float = SPACING,
    order: int = 3,
    antialias: bool = True,
) -> tuple[np.ndarray, NativeGrid]:
    """Resample a source-order array onto its :func:`~cahal_bids.core.grid.native_grid`.

    Spline interpolation of ``order`` (3: cubic B-spline with prefilter; 1: linear)
    with the exact voxel mapping of the grid contract, edge values repeated beyond
    the field of view. With ``antialias``, axes finer than ``spacing`` are first
    smoothed by :func:`antialias_sigmas`. Returns float32 (no clipping) and the grid.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    grid = native_grid(data.shape, matrix, spacing)
    source = np.asarray(data, dtype=np.float32)
    if antialias:
        sizes = np.sqrt(np.sum(matrix[:3, :3] ** 2, axis=0))
        sigmas = antialias_sigmas(sizes.tolist(), spacing)
        if any(sigma > 0 for sigma in sigmas):
            source = ndimage.gaussian_filter(source, sigmas, mode='nearest')
    linear, offset = _index_mapping(matrix, grid)
    out = ndimage.affine_transform(
        source,
        linear,
        offset,
        output_shape=grid.shape,
        output=np.float32,
        order=order,
        mode='nearest',
        prefilter=order > 1,
    )
    return out, grid


@contextlib.contextmanager
def _private_ants_tempfiles() -> Iterator[None]:
    """Make ``ants.atropos`` write its probability images into a folder deleted afterwards.

    ``ants.atropos`` names them with ``tempfile.mktemp`` in the system temporary
    folder and never removes them; its module-level ``mktemp`` is redirected here.
    """
    module = importlib.import_module('ants.segmentation.atropos')
    original = getattr(module, 'mktemp', None)
    with tempfile.TemporaryDirectory(prefix='cahal-atropos-') as folder:
        if original is None:
            yield
            return

        def _mktemp(suffix: str = '', prefix: str = 'tmp', dir: str | None = None) -> str:  # noqa: A002
            return original(suffix=suffix, prefix=prefix, dir=folder)

        module.mktemp = _mktemp  # type: ignore[attr-defined]
        try:
            yield
        finally:
            module.mktemp = original  # type: ignore[attr-defined]


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
        box = _bounding_box(mask, margin)
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
        raise PreparationError('ants.denoise_image returned its input unchanged (ITK error)')
    out = array.copy()
    out[box] = np.where(inside, filtered, crop)
    return out


def bias_corrected(image: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """N4 bias-field-corrected copy of a 1 mm image inside ``mask`` (0 outside)."""
    import ants

    with ants_seed(seed):
        corrected = ants.n4_bias_field_correction(
            ants.from_numpy(np.asarray(image, dtype=np.float32)),
            mask=ants.from_numpy(mask.astype(np.float32)),
            shrink_factor=N4_SHRINK_FACTOR,
        ).numpy()
    return np.where(mask, np.asarray(corrected, dtype=np.float32), 0.0).astype(np.float32)


def _kmeans_1d(values: np.ndarray, classes: int = 3, iterations: int = 100) -> np.ndarray:
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


def _parenchyma(image: np.ndarray, modality: str, centres: np.ndarray) -> np.ndarray:
    """Voxels whose intensity is nearer grey or white matter than CSF (and brighter than bone)."""
    order = INTENSITY_ORDER[modality]
    csf = order.index(CSF)
    if csf == 0:  # dark CSF (T1w, FLAIR)
        return image > 0.5 * (centres[0] + centres[1])
    # bright CSF (T2w): below halfway to CSF, above half the darkest tissue (skull, air)
    return (image < 0.5 * (centres[1] + centres[2])) & (image > 0.5 * centres[0])


def stripped_brain_mask(image: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Brain mask of a skull-stripped, normalised 1 mm image.

    The head mask's 1 mm smoothing grows it beyond the stripped brain; the voxels
    of its outer :data:`RIM_MM` at most :data:`BACKGROUND_LEVEL` (of the
    normalised scale) are that background and are removed (largest component,
    holes filled). Dark voxels deeper inside (CSF in fissures and ventricles) stay.
    """
    rim = head & ~_erode(head, RIM_MM, (1.0, 1.0, 1.0))
    brain = _largest_component(head & ~(rim & (image <= BACKGROUND_LEVEL)))
    return ndimage.binary_fill_holes(brain)


def template_brain_mask(
    image: np.ndarray,
    affine: np.ndarray,
    head: np.ndarray,
    *,
    modality: str,
    template: BrainTemplate,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Brain mask of a full-head 1 mm image: template prior, refined by intensity.

    ``image`` should be bias-corrected (:func:`bias_corrected`); ``affine`` is its
    voxel-to-world matrix (isotropic 1 mm). See the module docstring for the
    recipe. Returns the mask and a JSON-ready record of what was done.
    """
    import ants

    started = time.perf_counter()
    fixed = ants_image(image, affine)
    moving = ants.image_read(str(template.head))
    mask_image = ants.from_nibabel_nifti(template.brain_mask)
    with ants_seed(seed):
        registration = ants.registration(fixed, moving, type_of_transform='AffineFast')
    try:
        prior_image = ants.apply_transforms(
            fixed, mask_image, registration['fwdtransforms'], interpolator='linear'
        )
    finally:
        for name in {*registration['fwdtransforms'], *registration['invtransforms']}:
            with contextlib.suppress(OSError):
                Path(name).unlink()
    prior = (np.asarray(prior_image.numpy()) >= 0.5) & head
    registered = time.perf_counter()
    record: dict[str, Any] = {
        'method': 'template prior (AffineFast) refined by intensity',
        'template': template.name,
        'prior_litres': float(prior.sum()) / 1e6,
    }
    if not prior.any():
        raise PreparationError('the registered template brain mask does not overlap the head')

    sampling = (1.0, 1.0, 1.0)
    margin = int(math.ceil(PRIOR_GROWTH_MM + BRAIN_CLOSING_MM)) + 2
    box = _bounding_box(prior, (margin, margin, margin))
    sub_prior = prior[box]
    sub_image = image[box]
    core = _erode(sub_prior, PRIOR_CORE_MM, sampling)
    samples = sub_image[core if core.any() else sub_prior]
    centres = _kmeans_1d(samples[:: max(1, samples.size // 200_000)])
    region = _dilate(sub_prior, PRIOR_GROWTH_MM, sampling) & head[box]
    candidate = _parenchyma(sub_image, modality, centres) & region
    candidate = _largest_component(_open(candidate, BRAIN_OPENING_MM, sampling))
    brain_box = ndimage.binary_fill_holes(_close(candidate, BRAIN_CLOSING_MM, sampling)) & region
    brain = np.zeros(image.shape, dtype=bool)
    brain[box] = brain_box
    record.update(
        {
            'intensity_centres': [float(c) for c in centres],
            'prior_growth_mm': PRIOR_GROWTH_MM,
            'opening_mm': BRAIN_OPENING_MM,
            'closing_mm': BRAIN_CLOSING_MM,
            'seconds_registration': registered - started,
            'seconds_refinement': time.perf_counter() - registered,
        }
    )
    return brain, record


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
    centres = _kmeans_1d(samples[:: max(1, samples.size // 500_000)])
    initial = 'x'.join(f'{centre:.6g}' for centre in centres)
    with ants_seed(seed), _private_ants_tempfiles():
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


# --- the cached pipeline ------------------------------------------------------------------


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_metadata(folder: Path) -> dict[str, Any] | None:
    try:
        metadata = json.loads((folder / METADATA_NAME).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    write_json_atomic(path, content)


def _cached(folder: Path, sha256: str, parameters: Mapping[str, Any]) -> PreparedVolume | None:
    metadata = _read_metadata(folder)
    if metadata is None:
        return None
    if metadata.get('source_sha256') != sha256 or metadata.get('parameters') != parameters:
        return None
    if not all((folder / name).is_file() for name in OUTPUT_FILES.values()):
        return None
    return PreparedVolume(directory=folder, metadata=metadata, from_cache=True)


def _software_versions() -> dict[str, str]:
    versions = {
        'cahal_bids': __version__,
        'python': platform.python_version(),
        'numpy': np.__version__,
        'nibabel': nib.__version__,
    }
    for module in ('scipy', 'ants', 'templateflow', 'nilearn'):
        with contextlib.suppress(ImportError):
            versions['antspyx' if module == 'ants' else module] = str(
                getattr(importlib.import_module(module), '__version__', 'unknown')
            )
    return versions


def _jsonable_matrix(matrix: np.ndarray) -> list[list[float]]:
    return [[float(value) for value in row] for row in np.asarray(matrix)]


def prepare_image(
    source: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    modality: str,
    denoise: bool = True,
    shrink_factor: int = 1,
    brain_extracted: bool | None = None,
    seed: int = 0,
    template: BrainTemplate | None = None,
) -> PreparedVolume:
    """Prepare one high-resolution image (see the module docstring), or return it from the cache.

    ``shrink_factor`` is the denoiser's internal downsampling (1: full quality).
    ``brain_extracted`` None detects skull-stripped inputs
    (:func:`looks_brain_extracted`); True or False overrides the detection.
    ``template`` is used for full-head images (default
    :func:`default_brain_template`, resolved only when needed). Raises
    :class:`~cahal_bids.core.errors.InvalidImageError` naming the file when the image
    cannot be used, :class:`PreparationError` when a template is missing.
    """
    parameters = PreparationParameters(
        modality=modality,
        denoise=bool(denoise),
        shrink_factor=shrink_factor,
        brain_extracted=brain_extracted,
        seed=int(seed),
        template=None if template is None else template.name,
    ).as_dict()
    path = Path(source)
    folder = Path(cache_dir) / _stem(path)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    load_header(path)  # names the file if it is missing or not a usable NIfTI
    sha256 = file_sha256(path)
    hit = _cached(folder, sha256, parameters)
    if hit is not None:
        return hit
    loaded = load_image(path)
    timings['load'] = time.perf_counter() - started

    step = time.perf_counter()
    sizes = loaded.voxel_sizes
    if float(np.max(loaded.data)) <= 0:
        raise InvalidImageError(path, 'no positive intensity: nothing to prepare')
    head_source = estimate_head_mask(loaded.data, sizes)
    detected, evidence = looks_brain_extracted(loaded.data, head_source, sizes)
    is_extracted = detected if brain_extracted is None else bool(brain_extracted)
    timings['head_mask'] = time.perf_counter() - step

    step = time.perf_counter()
    data = loaded.data
    if denoise:
        data = nlm_denoise(data, head_source, sizes, shrink_factor=shrink_factor, seed=seed)
    timings['denoise'] = time.perf_counter() - step

    step = time.perf_counter()
    resampled, grid = resample_to_native_bspline(data, loaded.affine)
    np.maximum(resampled, 0.0, out=resampled)
    head_native, _ = resample_to_native_bspline(
        head_source.astype(np.float32), loaded.affine, order=1, antialias=False
    )
    reorientation = Reorientation.from_affine(grid.affine, grid.shape)
    image = reorientation.to_ras(resampled)
    head = reorientation.to_ras(head_native >= 0.5)
    affine = reorientation.ras_affine
    timings['resample'] = time.perf_counter() - step

    scaler = RobustScale.from_config(DEFAULT_NORMALIZATION, image)
    image = np.asarray(scaler.normalize(image), dtype=np.float32)

    step = time.perf_counter()
    corrected = bias_corrected(image, head, seed=seed)
    timings['bias_correction'] = time.perf_counter() - step

    step = time.perf_counter()
    if is_extracted:
        brain = stripped_brain_mask(image, head)
        brain_record: dict[str, Any] = {
            'method': 'head mask without its near-zero outer rim (skull-stripped input)',
            'threshold': BACKGROUND_LEVEL,
            'rim_mm': RIM_MM,
        }
    else:
        chosen = template if template is not None else default_brain_template()
        brain, brain_record = template_brain_mask(
            corrected, affine, head, modality=modality, template=chosen, seed=seed
        )
        brain_record['template_head_sha256'] = file_sha256(chosen.head)
    timings['brain_mask'] = time.perf_counter() - step

    step = time.perf_counter()
    labels, means = tissue_labels(corrected, brain, modality=modality, seed=seed)
    timings['labels'] = time.perf_counter() - step

    warnings = list(loaded.warnings)
    brain_litres = float(brain.sum()) / 1e6
    low, high = PLAUSIBLE_BRAIN_LITRES
    if not low <= brain_litres <= high:
        warnings.append(
            f'{path}: brain mask of {brain_litres:.2f} L is outside the plausible '
            f'{low}-{high} L; check {folder / OUTPUT_FILES["brain_mask"]}'
        )

    step = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METADATA_NAME).unlink(missing_ok=True)  # the entry is incomplete from here on
    save_image(image, affine, folder / OUTPUT_FILES['image'], dtype=np.float32)
    save_image(head, affine, folder / OUTPUT_FILES['head_mask'], dtype=np.uint8)
    save_image(brain, affine, folder / OUTPUT_FILES['brain_mask'], dtype=np.uint8)
    save_image(labels, affine, folder / OUTPUT_FILES['labels'], dtype=np.uint8)
    timings['save'] = time.perf_counter() - step
    timings['total'] = time.perf_counter() - started

    metadata: dict[str, Any] = {
        'source': str(path.resolve()),
        'source_sha256': sha256,
        'source_shape': list(loaded.shape),
        'source_voxel_sizes': [float(size) for size in sizes],
        'source_orientation': reorientation.source_code,
        'parameters': parameters,
        'grid': {
            'shape': list(image.shape),
            'affine': _jsonable_matrix(affine),
            'native_affine': _jsonable_matrix(grid.affine),
            'antialias_sigma_voxels': list(antialias_sigmas(sizes)),
        },
        'normalization': scaler.as_dict(),
        'brain_extracted': {
            'value': is_extracted,
            'decided_by': 'detection' if brain_extracted is None else 'argument',
            'detected': detected,
            **evidence,
        },
        'brain_mask': brain_record,
        'volumes_ml': {
            'head': float(head.sum()) / 1e3,
            'brain': float(brain.sum()) / 1e3,
            **{LABELS[k]: float(np.sum(labels == k)) / 1e3 for k in (CSF, GM, WM)},
        },
        'label_intensity_means': means,
        'timings_s': {key: round(value, 3) for key, value in timings.items()},
        'itk_threads': os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'),
        'software': _software_versions(),
        'warnings': warnings,
        'created': datetime.now(UTC).isoformat(timespec='seconds'),
    }
    _write_json(folder / METADATA_NAME, metadata)
    return PreparedVolume(directory=folder, metadata=metadata)


# --- datasets -----------------------------------------------------------------------------

_SUBJECT = re.compile(r'^sub-([A-Za-z0-9]+)$')


def _subject_label(label: str) -> str:
    return label[4:] if label.startswith('sub-') else label


def find_images(
    bids_dir: str | os.PathLike[str],
    *,
    modality: str,
    subjects: Iterable[str] | None = None,
    exclude_subjects: Iterable[str] = ('stroke01',),
) -> list[Path]:
    """``sub-*/[ses-*/]anat/*_<modality>.nii[.gz]`` of a BIDS folder, sorted.

    ``subjects`` and ``exclude_subjects`` take labels with or without ``sub-``.
    A subject both requested and excluded is an error (the validation subject is
    excluded by default; pass ``exclude_subjects=()`` to prepare it).
    """
    if modality not in MODALITIES:
        raise PreparationError(
            f'modality must be one of {", ".join(MODALITIES)}, got {modality!r}'
        )
    root = Path(bids_dir)
    if not root.is_dir():
        raise PreparationError(f'{root}: BIDS folder not found')
    wanted = None if subjects is None else {_subject_label(s) for s in subjects}
    excluded = {_subject_label(s) for s in exclude_subjects}
    if wanted is not None and wanted & excluded:
        both = ', '.join(f'sub-{s}' for s in sorted(wanted & excluded))
        raise PreparationError(f'{both} both requested and excluded')
    present = {
        match.group(1): folder
        for folder in sorted(root.iterdir())
        if folder.is_dir() and (match := _SUBJECT.match(folder.name))
    }
    if wanted is not None and (missing := sorted(wanted - set(present))):
        raise PreparationError(
            f'{root}: no such subject folder: {", ".join(f"sub-{s}" for s in missing)}'
        )
    images = []
    for label, folder in present.items():
        if label in excluded or (wanted is not None and label not in wanted):
            continue
        for anat in [folder / 'anat', *sorted(folder.glob('ses-*/anat'))]:
            for suffix in NIFTI_SUFFIXES:
                images.extend(sorted(anat.glob(f'*_{modality}{suffix}')))
    return sorted(images)


def _manifest_entry(cache_dir: Path, prepared: PreparedVolume) -> dict[str, Any]:
    metadata = prepared.metadata
    try:
        directory = str(prepared.directory.resolve().relative_to(cache_dir.resolve()))
    except ValueError:
        directory = str(prepared.directory.resolve())
    return {
        'source': metadata['source'],
        'source_sha256': metadata['source_sha256'],
        'modality': metadata['parameters']['modality'],
        'directory': directory,
        'files': dict(OUTPUT_FILES),
        'parameters': metadata['parameters'],
        'normalization_scale': metadata['normalization']['scale'],
        'brain_extracted': metadata['brain_extracted']['value'],
        'volumes_ml': metadata['volumes_ml'],
    }


def write_manifest(
    cache_dir: str | os.PathLike[str],
    prepared: Iterable[PreparedVolume],
    failed: Mapping[str, str] | None = None,
) -> Path:
    """Add ``prepared`` to ``cache_dir/manifest.json`` (atomically) and return its path.

    Entries already listed for other sources are kept when their folder still
    holds a prepared entry, so several runs (modalities) can share a cache; an
    entry of the same source and modality is replaced. ``failed`` maps source
    paths to error messages of this run.
    """
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST_NAME
    new = [_manifest_entry(root, item) for item in prepared]
    keys = {(entry['source'], entry['modality']) for entry in new}
    kept: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        previous = json.loads(path.read_text(encoding='utf-8'))
        for entry in previous.get('entries', []):
            if (entry['source'], entry['modality']) in keys:
                continue
            if (root / entry['directory'] / METADATA_NAME).is_file():
                kept.append(entry)
    entries = sorted([*kept, *new], key=lambda entry: (entry['modality'], entry['source']))
    manifest = {
        'cahal_bids_version': __version__,
        'preparation_version': PREPARATION_VERSION,
        'updated': datetime.now(UTC).isoformat(timespec='seconds'),
        'entries': entries,
        'failed': [{'source': src, 'error': msg} for src, msg in sorted((failed or {}).items())],
    }
    _write_json(path, manifest)
    return path


def prepare_dataset(
    bids_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    modality: str,
    subjects: Iterable[str] | None = None,
    exclude_subjects: Iterable[str] = ('stroke01',),
    denoise: bool = True,
    shrink_factor: int = 1,
    brain_extracted: bool | None = None,
    seed: int = 0,
    template: BrainTemplate | None = None,
    on_error: Callable[[Path, Exception], None] | None = None,
    on_prepared: Callable[[PreparedVolume], None] | None = None,
) -> list[PreparedVolume]:
    """Prepare every ``<modality>`` image of a BIDS folder (:func:`find_images`) in turn.

    Writes ``cache_dir/manifest.json`` (:func:`write_manifest`). Without
    ``on_error`` the first failure is raised (after the manifest of what was done
    is written); with it, each failing image is reported there and skipped.
    ``on_prepared`` is called after each image (for progress reports).
    """
    images = find_images(
        bids_dir, modality=modality, subjects=subjects, exclude_subjects=exclude_subjects
    )
    PreparationParameters(modality=modality, shrink_factor=shrink_factor)  # validate early
    prepared: list[PreparedVolume] = []
    failed: dict[str, str] = {}
    try:
        for source in images:
            try:
                item = prepare_image(
                    source,
                    cache_dir,
                    modality=modality,
                    denoise=denoise,
                    shrink_factor=shrink_factor,
                    brain_extracted=brain_extracted,
                    seed=seed,
                    template=template,
                )
            except Exception as exc:  # noqa: BLE001 - ANTs raises bare Exception; reported below
                failed[str(source.resolve())] = str(exc)
                if on_error is None:
                    raise
                on_error(source, exc)
                continue
            prepared.append(item)
            if on_prepared is not None:
                on_prepared(item)
    finally:
        write_manifest(cache_dir, prepared, failed)
    return prepared
