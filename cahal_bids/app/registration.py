"""ANTs linear registration of enhanced images: rigid then affine, ITK text transforms.

The enhanced image itself is never resampled by registration: the transform is
saved (forward and inverse, ITK text as niworkflows writes them), and resampling
into the template happens only when asked (:func:`apply_to_template`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cahal_bids.core.ants_bridge import ants_image, ants_seed
from cahal_bids.core.errors import CahalError
from cahal_bids.core.templates import TemplateNotFoundError
from cahal_bids.core.templates import template_file as templateflow_file

__all__ = [
    'RegistrationError',
    'RegistrationResult',
    'apply_to_template',
    'image_similarity',
    'register_linear',
    'resolve_template',
]


class RegistrationError(CahalError):
    """A template cannot be found, or registration failed."""


@dataclass(frozen=True)
class RegistrationResult:
    """Transforms written by :func:`register_linear` and how well they align."""

    forward: Path
    """Moving (image) to fixed (template) in ITK's convention: resamples moving onto fixed."""
    inverse: Path
    similarity: dict[str, float]
    stages: tuple[str, ...]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            'forward': str(self.forward),
            'inverse': str(self.inverse),
            'similarity': dict(self.similarity),
            'stages': list(self.stages),
            'seconds': round(self.seconds, 2),
        }


def resolve_template(
    template: str, *, template_file: str | os.PathLike[str] | None = None
) -> Path:
    """The T1w file of a TemplateFlow template at 1 mm, or ``template_file`` when given.

    TemplateFlow is only read, never asked to download: a missing or empty
    (placeholder) file raises :class:`RegistrationError` naming the template, the
    folder searched and the ``--template-file`` alternative.
    """
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file() or path.stat().st_size == 0:
            raise RegistrationError(f'{path}: template file not found or empty')
        return path.resolve()
    try:
        return templateflow_file(template, suffix='T1w', resolution=1)
    except TemplateNotFoundError as error:
        raise RegistrationError(
            f'template {template}: no 1 mm T1w image ({error}); cahal-bids never downloads '
            'at run time: pre-fetch it into TEMPLATEFLOW_HOME (the container does at build '
            'time), or pass --template-file PATH with --template-name LABEL'
        ) from None


def _read_ants(path: str | os.PathLike[str]) -> Any:
    """The float32 image at ``path`` as an ANTs image (trailing unit axes dropped)."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    return ants_image(data, image.affine)


def image_similarity(fixed: Any, moving_resampled: Any) -> dict[str, float]:
    """Mattes mutual information (ANTs sign: lower is better) and the correlation
    of the two images over the fixed image's foreground."""
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
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (rigid, then affine unless ``affine`` is False).

    Both stages use Mattes mutual information, so the images may differ in
    contrast (FLAIR to a T1w template). ``sloppy`` uses ANTs' fast presets (for
    tests and previews). The transforms are written as ITK text files.
    """
    import ants

    started = time.perf_counter()
    fixed_image = _read_ants(fixed)
    moving_image = _read_ants(moving)
    rigid_type = 'QuickRigid' if sloppy else 'Rigid'
    stages = [rigid_type]
    with tempfile.TemporaryDirectory(prefix='cahal-reg-') as scratch, ants_seed(seed):
        rigid = ants.registration(
            fixed_image,
            moving_image,
            type_of_transform=rigid_type,
            outprefix=str(Path(scratch) / 'rigid_'),
        )
        final = rigid
        if affine:
            stage = 'AffineFast' if sloppy else 'Affine'
            stages.append(stage)
            final = ants.registration(
                fixed_image,
                moving_image,
                type_of_transform=stage,
                initial_transform=rigid['fwdtransforms'][0],
                outprefix=str(Path(scratch) / 'affine_'),
            )
        matrix_file = final['fwdtransforms'][0]
        if not str(matrix_file).endswith('.mat'):
            raise RegistrationError(f'{moving}: unexpected ANTs output {final["fwdtransforms"]}')
        transform = ants.read_transform(matrix_file)
        similarity = image_similarity(fixed_image, final['warpedmovout'])
        forward = _write_itk_text(transform, Path(forward_path), scratch)
        inverse = _write_itk_text(transform.invert(), Path(inverse_path), scratch)
    return RegistrationResult(
        forward=forward,
        inverse=inverse,
        similarity=similarity,
        stages=tuple(stages),
        seconds=time.perf_counter() - started,
    )


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


def apply_to_template(
    moving: str | os.PathLike[str],
    fixed: str | os.PathLike[str],
    transform: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray]:
    """``moving`` resampled (linear) onto the grid of ``fixed`` through ``transform``.

    Returns the data and the affine of the fixed grid.
    """
    import ants

    fixed_image = _read_ants(fixed)
    warped = ants.apply_transforms(
        fixed=fixed_image,
        moving=_read_ants(moving),
        transformlist=[str(transform)],
        interpolator='linear',
    )
    converted = ants.to_nibabel_nifti(warped)
    return np.asarray(converted.dataobj, dtype=np.float32), np.asarray(converted.affine)
