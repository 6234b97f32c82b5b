"""ANTs linear registration (rigid, then affine) to a template, and how far to trust it.

:func:`register_linear` is the plain ANTs call (Mattes mutual information, multi-
resolution, ITK text transforms written forward and inverse). :func:`register_to_template`
builds on it for real inputs:

* **skull-stripped inputs** are recognised from the image (:func:`detect_brain_extracted`:
  ``preprocessing.masks.estimate_head_mask`` and ``looks_brain_extracted``, the tests
  training preparation uses) and registered to the brain-extracted template, the metric
  restricted to its brain mask grown by :data:`BRAIN_MASK_MARGIN_MM`
  (:func:`~cahal_bids.preprocessing.brain_template.brain_extracted_template`);
  full-head inputs are fitted whole to the full-head template first, then skull-stripped
  with the brain mask that fit carries over
  (:func:`~cahal_bids.preprocessing.registration_brain.strip_for_registration`) and
  aligned brain to brain (:func:`affine_from`), as fMRIPrep does;
* **initialisation** (:func:`~cahal_bids.preprocessing.registration_start.initial_alignment`):
  foreground centres matched, then the best of several coarse rigid starts along the
  head's long axis and about the left-right axis, so that tilted, shifted and partial
  thick-slice fields of view start in the right basin;
* **a quality measure**
  (:func:`~cahal_bids.preprocessing.registration_quality.registration_quality`):
  normalised mutual information with the template inside its brain mask, and a
  doubtful flag below a threshold calibrated on the validation split.

Every ANTs call runs under a fixed seed (``core.ants_bridge.ants_seed``): the same
inputs and seed give the same transforms when ITK runs one thread
(``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1`` before the first ANTs call of the process, as
``cahal-bids --omp-nthreads 1`` does); with several threads the metric's sums, and so the
transforms, change slightly from run to run. The thread setting in effect is recorded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cahal_bids.core.ants_bridge import ants_seed
from cahal_bids.core.errors import CahalError, PreprocessingError
from cahal_bids.preprocessing.registration_brain import strip_for_registration
from cahal_bids.preprocessing.registration_quality import read_ants, registration_quality
from cahal_bids.preprocessing.registration_start import (
    START_PITCHES_DEGREES,
    START_SHIFTS_MM,
    initial_alignment,
)
from cahal_bids.preprocessing.transforms import (
    compose,
    mask_points,
    mean_displacement,
    read_itk_affine,
    write_itk_affine,
)

if TYPE_CHECKING:
    from cahal_bids.preprocessing.brain_template import TemplateBrain

__all__ = [
    'AFFINE_COARSE_SCHEDULE',
    'AFFINE_FINE_SCHEDULE',
    'BRAIN_MASK_MARGIN_MM',
    'BRAIN_STAGE_SCHEDULE',
    'START_PITCHES_DEGREES',
    'START_SHIFTS_MM',
    'RegistrationError',
    'RegistrationResult',
    'affine_from',
    'apply_to_template',
    'compose_to_template',
    'detect_brain_extracted',
    'image_similarity',
    'initial_alignment',
    'register_linear',
    'register_to_template',
]

BRAIN_MASK_MARGIN_MM = 5.0
"""Growth (mm) of the template brain mask into the metric mask of skull-stripped inputs
(every stage) and of full-head inputs (the affine stage)."""

RIGID_SCHEDULE = {
    'aff_iterations': (500, 250),
    'aff_shrink_factors': (4, 2),
    'aff_smoothing_sigmas': (2, 1),
}
"""The rigid stage after the start of
:func:`~cahal_bids.preprocessing.registration_start.initial_alignment`
(which did the coarse levels already); the affine stage that follows keeps ANTs' default
schedule down to full resolution."""

AFFINE_COARSE_SCHEDULE = {
    'aff_iterations': (2100, 1200),
    'aff_shrink_factors': (6, 4),
    'aff_smoothing_sigmas': (3, 2),
}
"""With an ``affine_mask``: the affine stage's coarse levels (ANTs' defaults), in the
``fixed_mask`` if any, else on the whole image."""

AFFINE_FINE_SCHEDULE = {
    'aff_iterations': (1200, 10),
    'aff_shrink_factors': (2, 1),
    'aff_smoothing_sigmas': (1, 0),
}
"""With an ``affine_mask``: the affine stage's fine levels (ANTs' defaults), in the mask."""

AFFINE_FINE_SCHEDULE_SLOPPY = {
    'aff_iterations': (20,),
    'aff_shrink_factors': (2,),
    'aff_smoothing_sigmas': (1,),
}

BRAIN_STAGE_SCHEDULE = {
    'aff_iterations': (1200, 1200, 10),
    'aff_shrink_factors': (4, 2, 1),
    'aff_smoothing_sigmas': (2, 1, 0),
}
"""Schedule of the last stage of a full-head registration (the image's brain to the
brain-extracted template, affine, from the whole-head fit, so no start search and no rigid
stage)."""


class RegistrationError(CahalError):
    """A template cannot be found, or registration failed."""


@dataclass(frozen=True)
class RegistrationResult:
    """Transforms written by :func:`register_linear` and how well they align."""

    forward: Path
    """The image-to-template transform in ITK's convention (it resamples the image onto the
    template)."""
    inverse: Path
    similarity: dict[str, float]
    stages: tuple[str, ...]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    """Further JSON-ready facts (initialisation, brain extraction, quality)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            'forward': str(self.forward),
            'inverse': str(self.inverse),
            'similarity': dict(self.similarity),
            'stages': list(self.stages),
            'seconds': round(self.seconds, 2),
            **self.details,
        }


def detect_brain_extracted(path: str | os.PathLike[str]) -> tuple[bool, dict[str, float]]:
    """Whether the image at ``path`` is skull-stripped, from its voxels (never its name).

    Its head mask (``preprocessing.masks.estimate_head_mask``, at the image's own voxel
    sizes) and ``preprocessing.masks.looks_brain_extracted``: a zero background around a
    brain-sized mask. Use the acquired image (zeros stay zeros there; a restored or
    interpolated copy may ring into the background).
    """
    import nibabel as nib

    from cahal_bids.preprocessing.masks import estimate_head_mask, looks_brain_extracted

    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    sizes = tuple(float(v) for v in image.header.get_zooms()[:3])
    head = estimate_head_mask(data, sizes)
    return looks_brain_extracted(data, head, sizes)


def image_similarity(fixed: Any, moving_resampled: Any) -> dict[str, float]:
    """Mattes mutual information (ANTs sign: lower is better) and the correlation
    of the two images over the fixed image's brighter half (the whole head: not a
    quality measure, see :func:`registration_quality`)."""
    import ants

    fixed_data = fixed.numpy()
    moving_data = moving_resampled.numpy()
    foreground = fixed_data > np.percentile(fixed_data, 50)
    correlation = float(np.corrcoef(fixed_data[foreground], moving_data[foreground])[0, 1])
    mutual_information = float(
        ants.image_similarity(fixed, moving_resampled, metric_type='MattesMutualInformation')
    )
    return {'mattes_mi': mutual_information, 'correlation': correlation}


def register_linear(
    moving: str | os.PathLike[str],
    fixed: str | os.PathLike[str],
    *,
    forward_path: str | os.PathLike[str],
    inverse_path: str | os.PathLike[str],
    affine: bool = True,
    sloppy: bool = False,
    seed: int = 0,
    fixed_mask: str | os.PathLike[str] | None = None,
    affine_mask: str | os.PathLike[str] | None = None,
    initialize: bool = False,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (rigid, then affine unless ``affine`` is False).

    Both stages use Mattes mutual information, so the images may differ in
    contrast (FLAIR to a T1w template). ``sloppy`` uses ANTs' fast presets (for
    tests and previews). ``fixed_mask`` restricts the metric to a region of the
    fixed image in every stage, or, with ``affine_mask``, in every stage but the two
    finest levels of the affine stage (:data:`AFFINE_FINE_SCHEDULE`), which use
    ``affine_mask`` (after a start, a rigid stage and the coarse affine levels in
    ``fixed_mask`` or on the whole image); ``initialize`` starts from
    :func:`~cahal_bids.preprocessing.registration_start.initial_alignment`
    instead of ANTs' match of the intensity centres of mass.
    The transforms are written as ITK text files.
    """
    import ants

    started = time.perf_counter()
    fixed_image = read_ants(fixed)
    moving_image = read_ants(moving)
    mask_image = None if fixed_mask is None else read_ants(fixed_mask)
    affine_mask_image = mask_image if affine_mask is None else read_ants(affine_mask)
    rigid_type = 'QuickRigid' if sloppy else 'Rigid'
    stages = [rigid_type]
    # reproducible only with one ITK thread, decided before the process's first ANTs call
    details: dict[str, Any] = {
        'seed': seed,
        'itk_threads': os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', 'default'),
    }
    with tempfile.TemporaryDirectory(prefix='cahal-reg-') as scratch, ants_seed(seed):
        start = None
        if initialize:
            start = str(Path(scratch) / 'start.mat')
            details['initialization'] = initial_alignment(
                fixed_image, moving_image, start, fixed_mask=mask_image, seed=seed
            )
        # after the initialisation, a rigid stage followed by an affine one need not
        # run ANTs' coarsest and finest levels
        schedule = RIGID_SCHEDULE if initialize and affine and not sloppy else {}
        rigid = ants.registration(
            fixed_image,
            moving_image,
            type_of_transform=rigid_type,
            initial_transform=start,
            mask=mask_image,
            outprefix=str(Path(scratch) / 'rigid_'),
            **schedule,
        )
        final = rigid
        if affine:
            stage = 'AffineFast' if sloppy else 'Affine'
            stages.append(stage)
            # (AffineFast runs the coarse levels only already)
            coarse = {} if affine_mask is None or sloppy else AFFINE_COARSE_SCHEDULE
            final = ants.registration(
                fixed_image,
                moving_image,
                type_of_transform=stage,
                initial_transform=rigid['fwdtransforms'][0],
                mask=mask_image,
                outprefix=str(Path(scratch) / 'affine_'),
                **coarse,
            )
        if affine and affine_mask is not None:
            # the finest levels within the mask, from the whole-image affine
            stages.append('Affine in the mask')
            refined = ants.registration(
                fixed_image,
                moving_image,
                type_of_transform='Affine',
                initial_transform=final['fwdtransforms'][0],
                mask=affine_mask_image,
                outprefix=str(Path(scratch) / 'masked_'),
                **(AFFINE_FINE_SCHEDULE_SLOPPY if sloppy else AFFINE_FINE_SCHEDULE),
            )
            # how far the masked levels moved the coarser fit: recorded, for the reports
            moved = _mean_move(final, refined, affine_mask, scratch)
            details['mask_refinement'] = {'moved_mm': round(moved, 3)}
            final = refined
        forward, inverse, similarity = _written_result(
            moving, fixed_image, final, forward_path, inverse_path, scratch
        )
    return RegistrationResult(
        forward=forward,
        inverse=inverse,
        similarity=similarity,
        stages=tuple(stages),
        seconds=time.perf_counter() - started,
        details=details,
    )


def _mean_move(before: Any, after: Any, mask: str | os.PathLike[str], scratch: str) -> float:
    """Mean displacement (mm) between two ANTs registration results over a mask's voxels."""
    import ants

    matrices = []
    for index, result in enumerate((before, after)):
        text = Path(scratch) / f'move_{index}.txt'
        ants.write_transform(ants.read_transform(result['fwdtransforms'][0]), str(text))
        matrices.append(read_itk_affine(text))
    return mean_displacement(matrices[0], matrices[1], mask_points(mask, step=2))


def _written_result(
    moving: str | os.PathLike[str],
    fixed_image: Any,
    result: Mapping[str, Any],
    forward_path: str | os.PathLike[str],
    inverse_path: str | os.PathLike[str],
    scratch: str,
) -> tuple[Path, Path, dict[str, float]]:
    """An ANTs registration result's affine written forward and inverse (ITK text), and
    its similarity to ``fixed_image``."""
    import ants

    matrix_file = result['fwdtransforms'][0]
    if not str(matrix_file).endswith('.mat'):
        raise RegistrationError(f'{moving}: unexpected ANTs output {result["fwdtransforms"]}')
    transform = ants.read_transform(matrix_file)
    similarity = image_similarity(fixed_image, result['warpedmovout'])
    forward = _write_itk_text(transform, Path(forward_path), scratch)
    inverse = _write_itk_text(transform.invert(), Path(inverse_path), scratch)
    return forward, inverse, similarity


def _write_itk_text(transform: Any, target: Path, scratch: str) -> Path:
    """Write an ANTs transform as ITK text, atomically (written aside, then moved)."""
    import ants

    temporary = Path(scratch) / f'{target.name}.tmp.txt'
    ants.write_transform(transform, str(temporary))
    text = temporary.read_text()
    if not text.startswith('#Insight Transform File'):
        raise RegistrationError(f'{target}: ANTs did not write an ITK text transform')
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(temporary, target.with_name(target.name + '.part'))
    os.replace(target.with_name(target.name + '.part'), target)
    return target


def affine_from(
    moving: str | os.PathLike[str],
    fixed: str | os.PathLike[str],
    start: str | os.PathLike[str],
    *,
    forward_path: str | os.PathLike[str],
    inverse_path: str | os.PathLike[str],
    fixed_mask: str | os.PathLike[str] | None = None,
    sloppy: bool = False,
    seed: int = 0,
) -> RegistrationResult:
    """An affine stage (:data:`BRAIN_STAGE_SCHEDULE`) of ``moving`` to ``fixed`` from ``start``.

    ``start`` is an ITK text transform (image to ``fixed``), e.g. a whole-head fit; the
    result (written forward and inverse as ITK text) includes it.
    """
    import ants

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='cahal-reg-') as scratch, ants_seed(seed):
        initial = str(Path(scratch) / 'start.mat')
        ants.write_transform(ants.read_transform(str(start)), initial)
        fixed_image = read_ants(fixed)
        result = ants.registration(
            fixed_image,
            read_ants(moving),
            type_of_transform='Affine',
            initial_transform=initial,
            mask=None if fixed_mask is None else read_ants(fixed_mask),
            outprefix=str(Path(scratch) / 'brain_'),
            **(AFFINE_FINE_SCHEDULE_SLOPPY if sloppy else BRAIN_STAGE_SCHEDULE),
        )
        forward, inverse, similarity = _written_result(
            moving, fixed_image, result, forward_path, inverse_path, scratch
        )
    return RegistrationResult(
        forward=forward,
        inverse=inverse,
        similarity=similarity,
        stages=('Affine, brain to brain',),
        seconds=time.perf_counter() - started,
    )


def register_to_template(
    moving: str | os.PathLike[str],
    template: TemplateBrain,
    *,
    forward_path: str | os.PathLike[str],
    inverse_path: str | os.PathLike[str],
    modality: str,
    brain_extracted: bool | None = None,
    detect_from: str | os.PathLike[str] | None = None,
    sloppy: bool = False,
    seed: int = 0,
) -> RegistrationResult:
    """Rigid then affine registration of ``moving`` to a template, brain to brain, checked.

    ``brain_extracted`` None detects it (:func:`detect_brain_extracted`) on
    ``detect_from`` (the acquired image) or else on ``moving``. Skull-stripped images go
    to the brain-extracted template with its brain mask (grown by
    :data:`BRAIN_MASK_MARGIN_MM`) in every stage. Full-head images are first fitted
    whole to the full-head template (started, rigid, affine at coarse levels on the whole
    head, the two finest levels within the grown brain mask: the head's outline is the
    robust cue, for any contrast), which carries the template's brain mask onto them;
    they are then skull-stripped with it
    (:func:`~cahal_bids.preprocessing.registration_brain.strip_for_registration`) and
    their brain aligned to the brain-extracted template (:func:`affine_from`), as
    fMRIPrep does, so that a head and a skull-stripped copy of it land together. If no
    plausible brain is found, the whole-head fit stays and the record says why. Starts
    from :func:`~cahal_bids.preprocessing.registration_start.initial_alignment`; the
    result's ``details`` hold the decision, the initialisation, the brain stage and
    :func:`~cahal_bids.preprocessing.registration_quality.registration_quality` (always
    of ``moving`` itself).
    """
    import ants

    evidence: dict[str, float] = {}
    if brain_extracted is None:
        brain_extracted, evidence = detect_brain_extracted(detect_from or moving)
    with tempfile.TemporaryDirectory(prefix='cahal-regmask-') as scratch:
        mask = read_ants(template.brain_mask)
        grown = ants.iMath(mask, 'MD', int(round(BRAIN_MASK_MARGIN_MM)))
        metric_mask = Path(scratch) / 'metric_mask.nii.gz'
        ants.image_write(grown, str(metric_mask))
        whole = Path(scratch) / 'whole_head'
        result = register_linear(
            moving,
            template.brain if brain_extracted else template.head,
            forward_path=forward_path if brain_extracted else whole / 'forward.txt',
            inverse_path=inverse_path if brain_extracted else whole / 'inverse.txt',
            sloppy=sloppy,
            seed=seed,
            fixed_mask=metric_mask if brain_extracted else None,
            affine_mask=None if brain_extracted else metric_mask,
            initialize=True,
        )
        stages = ('Initialization', *result.stages)
        fixed = 'brain-extracted template, brain mask'
        extra: dict[str, Any] = {}
        if not brain_extracted:
            stripped = Path(scratch) / 'brain.nii.gz'
            try:
                strip = strip_for_registration(
                    moving,
                    template.brain_mask,
                    result.forward,
                    modality=modality,
                    out_file=stripped,
                    seed=seed,
                )
            except PreprocessingError as error:
                strip = None
                extra['brain_stage'] = {'skipped': str(error)}
            if strip is None:
                result = _copy_result(result, forward_path, inverse_path)
                fixed = 'template head, brain mask in the finest affine levels'
            else:
                brain_fit = affine_from(
                    stripped,
                    template.brain,
                    result.forward,
                    forward_path=forward_path,
                    inverse_path=inverse_path,
                    fixed_mask=metric_mask,
                    sloppy=sloppy,
                    seed=seed,
                )
                moved = mean_displacement(
                    read_itk_affine(result.forward),
                    read_itk_affine(brain_fit.forward),
                    mask_points(template.brain_mask, step=2),
                )
                extra['brain_stage'] = {
                    **strip,
                    'moved_mm': round(moved, 3),
                    'seconds': round(strip['seconds'] + brain_fit.seconds, 2),
                }
                stages = (*stages, 'Skull-stripping', *brain_fit.stages)
                fixed = 'template head (whole-head fit), then brain to brain-extracted template'
                result = RegistrationResult(
                    forward=brain_fit.forward,
                    inverse=brain_fit.inverse,
                    similarity=brain_fit.similarity,
                    stages=stages,
                    seconds=result.seconds + strip['seconds'] + brain_fit.seconds,
                    details=result.details,
                )
    quality = registration_quality(moving, template, result.forward, modality=modality)
    details = {
        **result.details,
        **extra,
        'brain_extracted': bool(brain_extracted),
        'brain_extracted_evidence': {k: round(float(v), 4) for k, v in evidence.items()},
        'fixed': fixed,
        'quality': quality,
    }
    return RegistrationResult(
        forward=result.forward,
        inverse=result.inverse,
        similarity=result.similarity,
        stages=stages,
        seconds=result.seconds,
        details=details,
    )


def _copy_result(
    result: RegistrationResult,
    forward_path: str | os.PathLike[str],
    inverse_path: str | os.PathLike[str],
) -> RegistrationResult:
    """``result`` with its transforms copied (atomically) to the given paths."""
    copied = []
    for source, target in ((result.forward, forward_path), (result.inverse, inverse_path)):
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target.with_name(target.name + '.part'))
        os.replace(target.with_name(target.name + '.part'), target)
        copied.append(target)
    return RegistrationResult(
        forward=copied[0],
        inverse=copied[1],
        similarity=result.similarity,
        stages=result.stages,
        seconds=result.seconds,
        details=result.details,
    )


def apply_to_template(
    moving: str | os.PathLike[str],
    fixed: str | os.PathLike[str],
    transform: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray]:
    """``moving`` resampled (linear) onto the grid of ``fixed`` through ``transform``.

    Returns the data and the affine of the fixed grid.
    """
    import ants

    fixed_image = read_ants(fixed)
    warped = ants.apply_transforms(
        fixed=fixed_image,
        moving=read_ants(moving),
        transformlist=[str(transform)],
        interpolator='linear',
    )
    converted = ants.to_nibabel_nifti(warped)
    return np.asarray(converted.dataobj, dtype=np.float32), np.asarray(converted.affine)


def compose_to_template(
    moving: str | os.PathLike[str],
    to_intermediate: str | os.PathLike[str],
    intermediate_to_template: str | os.PathLike[str],
    template: TemplateBrain,
    *,
    forward_path: str | os.PathLike[str],
    inverse_path: str | os.PathLike[str],
    modality: str,
    intermediate: str = 'T1w',
) -> RegistrationResult:
    """The template transform of ``moving`` through an image of the same subject (fMRIPrep's way).

    ``to_intermediate`` takes ``moving`` to the intermediate image (e.g. a FLAIR rigidly
    to its session's T1w), ``intermediate_to_template`` takes that image to the template;
    both are forward ITK text transforms. Their composition (:func:`~.transforms.compose`)
    is written forward and inverse, and checked like a direct registration
    (:func:`~cahal_bids.preprocessing.registration_quality.registration_quality` on
    ``moving``), so a thick FLAIR never has to match the T1w template on its own.
    """
    started = time.perf_counter()
    matrix = compose(read_itk_affine(to_intermediate), read_itk_affine(intermediate_to_template))
    forward = write_itk_affine(matrix, forward_path)
    inverse = write_itk_affine(np.linalg.inv(matrix), inverse_path)
    quality = registration_quality(moving, template, forward, modality=modality)
    return RegistrationResult(
        forward=forward,
        inverse=inverse,
        similarity={},
        stages=(f'composed: rigid to {intermediate}, then {intermediate} to template',),
        seconds=time.perf_counter() - started,
        details={'composed_through': intermediate, 'quality': quality},
    )
