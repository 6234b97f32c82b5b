"""Brain masks from a template prior refined by intensity: of full-head images, and of the
registration template itself (the brain-extracted template, cached once per work folder)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from cahal_bids.core.ants_bridge import ants_image, ants_seed
from cahal_bids.core.atomic import write_json_atomic
from cahal_bids.core.errors import PreprocessingError
from cahal_bids.core.hashing import file_sha256
from cahal_bids.core.nifti import save_image
from cahal_bids.core.templates import TemplateNotFoundError, template_file
from cahal_bids.preprocessing.masks import (
    bounding_box,
    close,
    dilate,
    erode,
    estimate_head_mask,
    largest_component,
    open_,
)
from cahal_bids.preprocessing.tissues import kmeans_1d, parenchyma

__all__ = [
    'TEMPLATE_BRAIN_VERSION',
    'BrainTemplate',
    'TemplateBrain',
    'brain_extracted_template',
    'default_brain_template',
    'nilearn_brain_mask',
    'refine_brain_prior',
    'template_brain_mask',
    'template_own_brain_mask',
]


PRIOR_GROWTH_MM = 5.0
"""How far (mm) the brain may reach beyond the registered template prior."""

PRIOR_CORE_MM = 3.0
"""Erosion (mm) of the prior whose voxels give the tissue intensities (its core)."""

BRAIN_OPENING_MM = 2.0
"""Opening (mm) that cuts thin bridges between brain and scalp or dura."""

BRAIN_CLOSING_MM = 5.0
"""Closing (mm) that fills sulci and fissures back in."""


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

    The head comes from TemplateFlow (``TEMPLATEFLOW_HOME``, read offline by
    ``core.templates.template_file``);
    the brain mask is ``nilearn.datasets.load_mni152_brain_mask(resolution=1)``,
    the thresholded brain-extracted ICBM 2009a symmetric template that nilearn
    ships. Both templates live in the same MNI world space and differ by a millimetre
    or two at the brain's edge, which the intensity refinement of
    :func:`template_brain_mask` absorbs.
    """
    try:
        head = template_file('MNI152NLin2009cAsym', suffix='T1w', resolution=1)
    except TemplateNotFoundError as exc:
        raise PreprocessingError(
            f'cannot get the MNI152NLin2009cAsym 1 mm T1w template ({exc}); point '
            'TEMPLATEFLOW_HOME at a folder holding '
            'tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz'
        ) from None
    return BrainTemplate(
        head=head,
        brain_mask=nilearn_brain_mask(),
        name='MNI152NLin2009cAsym T1w (TemplateFlow) + MNI152NLin2009aSym brain mask (nilearn)',
    )


def nilearn_brain_mask() -> nib.Nifti1Image:
    """``nilearn.datasets.load_mni152_brain_mask(resolution=1)`` as float32 (offline).

    The thresholded brain-extracted ICBM 2009a symmetric template that nilearn ships
    inside its package (no download), in MNI world space.
    """
    try:
        from nilearn.datasets import load_mni152_brain_mask
    except ImportError as exc:
        raise PreprocessingError(
            f'nilearn is needed for the brain mask of full-head images ({exc}); '
            'install nilearn or pass brain_extracted=True for skull-stripped images'
        ) from None
    mask = load_mni152_brain_mask(resolution=1)
    brain_mask = nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.float32), mask.affine)
    brain_mask.header.set_xyzt_units(xyz='mm', t='sec')
    return brain_mask


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

    ``image`` should be bias-corrected (``preprocessing.bias_field``); ``affine`` is its
    voxel-to-world matrix (isotropic 1 mm). See the module docstring for the
    recipe. Returns the mask and a JSON-ready record of what was done.
    """
    started = time.perf_counter()
    prior, prior_record = _registered_prior(image, affine, head, template, seed)
    registered = time.perf_counter()
    record: dict[str, Any] = {
        'method': 'template prior (AffineFast) refined by intensity',
        'template': template.name,
        **prior_record,
    }
    if not prior.any():
        raise PreprocessingError('the registered template brain mask does not overlap the head')

    brain, refinement = refine_brain_prior(image, prior, head, modality=modality)
    record.update(refinement)
    record.update(
        {
            'seconds_registration': registered - started,
            'seconds_refinement': time.perf_counter() - registered,
        }
    )
    return brain, record


def refine_brain_prior(
    image: np.ndarray,
    prior: np.ndarray,
    head: np.ndarray,
    *,
    modality: str,
    voxel_sizes: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, dict[str, Any]]:
    """A brain mask from a prior (a template mask carried onto ``image``), by intensity.

    Within the prior dilated by :data:`PRIOR_GROWTH_MM` (and the head), the voxels
    nearer grey or white matter than CSF (a 1D k-means of the prior's core, eroded by
    :data:`PRIOR_CORE_MM`), opened with a :data:`BRAIN_OPENING_MM` ball, largest
    component, closed with a :data:`BRAIN_CLOSING_MM` ball, holes filled (radii in mm
    at ``voxel_sizes``). Returns the mask and a JSON-ready record of the parameters.
    """
    sampling = tuple(float(size) for size in voxel_sizes)
    reach = PRIOR_GROWTH_MM + BRAIN_CLOSING_MM
    box = bounding_box(prior, tuple(int(math.ceil(reach / size)) + 2 for size in sampling))
    sub_prior = prior[box]
    sub_image = image[box]
    core = erode(sub_prior, PRIOR_CORE_MM, sampling)
    samples = sub_image[core if core.any() else sub_prior]
    centres = kmeans_1d(samples[:: max(1, samples.size // 200_000)])
    region = dilate(sub_prior, PRIOR_GROWTH_MM, sampling) & head[box]
    candidate = parenchyma(sub_image, modality, centres) & region
    candidate = largest_component(open_(candidate, BRAIN_OPENING_MM, sampling))
    brain_box = ndimage.binary_fill_holes(close(candidate, BRAIN_CLOSING_MM, sampling)) & region
    brain = np.zeros(image.shape, dtype=bool)
    brain[box] = brain_box
    record = {
        'intensity_centres': [float(c) for c in centres],
        'prior_growth_mm': PRIOR_GROWTH_MM,
        'opening_mm': BRAIN_OPENING_MM,
        'closing_mm': BRAIN_CLOSING_MM,
    }
    return brain, record


TEMPLATE_BRAIN_VERSION = 1
"""Version of the recipe of :func:`template_own_brain_mask`; a change recomputes caches."""


@dataclass(frozen=True)
class TemplateBrain:
    """A registration template with its brain: head, brain-extracted head and brain mask.

    ``record`` is the content of ``template_brain.json`` (recipe, sha256 of each file).
    """

    name: str
    head: Path
    brain: Path
    brain_mask: Path
    record: dict[str, Any]


def template_own_brain_mask(
    head_file: str | os.PathLike[str], *, mni_space: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The brain mask of a 1 mm T1w template (no mask of its own needed); data, affine, record.

    The prior is nilearn's MNI152NLin2009aSym brain mask (:func:`nilearn_brain_mask`).
    With ``mni_space`` (any MNI152 template, e.g. MNI152NLin2009cAsym) it lives in the
    template's world space already and is resampled (linear, kept at >= 1/2) onto the
    template grid; otherwise nilearn's own 2009a head is registered to the template
    (ANTs ``AffineFast``, as :func:`template_brain_mask` does for images) and the
    mask follows. The prior, inside the template's head mask, is then refined by
    intensity exactly as for images (:func:`refine_brain_prior`, T1w contrast). The
    result depends only on the template file and this recipe, so it can be cached
    and checked by sha256 (:func:`brain_extracted_template`).
    """
    from nibabel.processing import resample_from_to

    image = nib.load(str(head_file))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    sizes = tuple(float(v) for v in image.header.get_zooms()[:3])
    if not np.allclose(sizes, 1.0, atol=1e-3):
        raise PreprocessingError(f'{head_file}: template voxels {sizes} mm, expected 1 mm')
    head = estimate_head_mask(data, sizes)
    if mni_space:
        resampled = resample_from_to(nilearn_brain_mask(), (data.shape, image.affine), order=1)
        prior = (np.asarray(resampled.dataobj) >= 0.5) & head
        record: dict[str, Any] = {
            'prior': 'nilearn MNI152NLin2009aSym brain mask, resampled (same MNI world space)'
        }
    else:
        from nilearn.datasets import load_mni152_template

        nilearn_head = load_mni152_template(resolution=1)
        with tempfile.TemporaryDirectory(prefix='cahal-template-') as folder:
            head_path = Path(folder) / 'nilearn_mni152_head.nii.gz'
            nib.save(nilearn_head, head_path)
            chosen = BrainTemplate(
                head=head_path, brain_mask=nilearn_brain_mask(), name='MNI152NLin2009aSym'
            )
            prior, prior_record = _registered_prior(data, image.affine, head, chosen, seed)
        record = {'prior': 'nilearn MNI152NLin2009aSym head and brain mask, AffineFast'}
        record.update(prior_record)
    if not prior.any():
        raise PreprocessingError(f'{head_file}: the brain mask prior does not overlap the head')
    brain, refinement = refine_brain_prior(data, prior, head, modality='T1w')
    record.update(refinement)
    record['brain_litres'] = float(brain.sum()) * float(np.prod(sizes)) / 1e6
    return brain, np.asarray(image.affine), record


def _registered_prior(
    data: np.ndarray, affine: np.ndarray, head: np.ndarray, template: BrainTemplate, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    import ants

    fixed = ants_image(data, affine)
    moving = ants.image_read(str(template.head))
    with ants_seed(seed):
        registration = ants.registration(fixed, moving, type_of_transform='AffineFast')
    try:
        prior_image = ants.apply_transforms(
            fixed,
            ants.from_nibabel_nifti(template.brain_mask),
            registration['fwdtransforms'],
            interpolator='linear',
        )
    finally:
        for name in {*registration['fwdtransforms'], *registration['invtransforms']}:
            with contextlib.suppress(OSError):
                Path(name).unlink()
    prior = (np.asarray(prior_image.numpy()) >= 0.5) & head
    return prior, {'prior_litres': float(prior.sum()) / 1e6}


def _cached(folder: Path, head_sha256: str) -> dict[str, Any] | None:
    """The record of a complete, unaltered cache entry for this head, else None."""
    try:
        record = json.loads((folder / 'template_brain.json').read_text())
    except (OSError, ValueError):
        return None
    if record.get('version') != TEMPLATE_BRAIN_VERSION or record.get('head_sha256') != head_sha256:
        return None
    for key, name in (
        ('brain_mask_sha256', 'brain_mask.nii.gz'),
        ('brain_sha256', 'brain.nii.gz'),
    ):
        path = folder / name
        if not path.is_file() or file_sha256(path) != record.get(key):
            return None
    return record


def brain_extracted_template(
    head_file: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    name: str,
    mni_space: bool = True,
    seed: int = 0,
) -> TemplateBrain:
    """The brain mask and brain-extracted head of a template, computed once and checked.

    Written into ``cache_dir/<name>-<first 12 hex digits of the head's sha256>/``:
    ``brain_mask.nii.gz`` (uint8), ``brain.nii.gz`` (the head times the mask) and,
    last, ``template_brain.json`` with the recipe version and the sha256 of the head
    and of both files. A later call returns the cached files when every sha256 still
    matches and recomputes them otherwise (a changed template, an edited or truncated
    file, a new recipe). The mask comes from :func:`template_own_brain_mask`.
    """
    head = Path(head_file).resolve()
    head_sha256 = file_sha256(head)
    folder = Path(cache_dir) / f'{name}-{head_sha256[:12]}'
    record = _cached(folder, head_sha256)
    if record is None:
        started = time.perf_counter()
        mask, affine, details = template_own_brain_mask(head, mni_space=mni_space, seed=seed)
        head_data = np.asarray(nib.load(str(head)).dataobj, dtype=np.float32).reshape(mask.shape)
        folder.mkdir(parents=True, exist_ok=True)
        mask_path = save_image(mask, affine, folder / 'brain_mask.nii.gz', dtype=np.uint8)
        brain_path = save_image(np.where(mask, head_data, 0), affine, folder / 'brain.nii.gz')
        record = {
            'version': TEMPLATE_BRAIN_VERSION,
            'template': name,
            'head': str(head),
            'head_sha256': head_sha256,
            'brain_mask_sha256': file_sha256(mask_path),
            'brain_sha256': file_sha256(brain_path),
            'recipe': details,
            'seconds': round(time.perf_counter() - started, 2),
        }
        write_json_atomic(folder / 'template_brain.json', record)
    return TemplateBrain(
        name=name,
        head=head,
        brain=folder / 'brain.nii.gz',
        brain_mask=folder / 'brain_mask.nii.gz',
        record=record,
    )
