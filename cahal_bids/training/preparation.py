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
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cahal_bids import __version__
from cahal_bids.core.atomic import write_json_atomic
from cahal_bids.core.errors import InvalidImageError
from cahal_bids.core.hashing import file_sha256
from cahal_bids.core.modalities import MODALITIES
from cahal_bids.core.nifti import load_header, load_image, nifti_stem, save_image
from cahal_bids.core.normalization import DEFAULT_NORMALIZATION, RobustScale
from cahal_bids.core.orientation import Reorientation
from cahal_bids.preprocessing.bias_field import N4_SHRINK_FACTOR, bias_corrected
from cahal_bids.preprocessing.brain_template import (
    BrainTemplate,
    default_brain_template,
    template_brain_mask,
)
from cahal_bids.preprocessing.bspline import SPACING, antialias_sigmas, resample_to_native_bspline
from cahal_bids.preprocessing.denoising import nlm_denoise
from cahal_bids.preprocessing.masks import (
    BACKGROUND_LEVEL,
    RIM_MM,
    estimate_head_mask,
    looks_brain_extracted,
    stripped_brain_mask,
)
from cahal_bids.preprocessing.tissues import (
    ATROPOS_CONVERGENCE,
    ATROPOS_MRF,
    CSF,
    GM,
    LABELS,
    WM,
    tissue_labels,
)
from cahal_bids.training.discovery import VALIDATION_SUBJECTS, find_images
from cahal_bids.training.prepared import (
    MANIFEST_NAME,
    METADATA_NAME,
    OUTPUT_FILES,
    PreparationError,
    PreparedVolume,
    read_metadata,
)

__all__ = [
    'MANIFEST_NAME',
    'METADATA_NAME',
    'PREPARATION_VERSION',
    'PreparationError',
    'PreparationParameters',
    'PreparedVolume',
    'find_images',
    'prepare_dataset',
    'prepare_image',
    'write_manifest',
]

PREPARATION_VERSION = 1
"""Version of the preparation recipe; part of the cache key, bump it when the output changes."""


PLAUSIBLE_BRAIN_LITRES = (0.8, 2.0)
"""Brain-mask volumes outside this range are recorded as warnings."""


# Morphology and intensity parameters (millimetres), documented in the module docstring.


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


# --- morphology ---------------------------------------------------------------------------


# --- steps --------------------------------------------------------------------------------


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


# --- the cached pipeline ------------------------------------------------------------------


def _stem(path: Path) -> str:
    stem = nifti_stem(path)
    return stem if stem != path.name else path.stem


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    write_json_atomic(path, content)


def _cached(folder: Path, sha256: str, parameters: Mapping[str, Any]) -> PreparedVolume | None:
    metadata = read_metadata(folder)
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
    exclude_subjects: Iterable[str] = VALIDATION_SUBJECTS,
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
