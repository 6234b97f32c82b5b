"""The app's side of registration: which template file, and its brain (cached in the work folder).

The registration itself (ANTs rigid then affine, skull-stripped inputs, initialisation,
the quality measure) is a library function of the preprocessing layer,
:mod:`cahal_bids.preprocessing.registration`, shared with the evaluation protocol; its
names are re-exported here for code that imported them from this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from cahal_bids.core.templates import TemplateNotFoundError
from cahal_bids.core.templates import template_file as templateflow_file
from cahal_bids.preprocessing.brain_template import TemplateBrain, brain_extracted_template
from cahal_bids.preprocessing.registration import (
    RegistrationError,
    RegistrationResult,
    apply_to_template,
    image_similarity,
    register_linear,
    register_to_template,
)

__all__ = [
    'RegistrationError',
    'RegistrationResult',
    'apply_to_template',
    'image_similarity',
    'register_linear',
    'register_to_template',
    'resolve_template',
    'template_brain',
]


def resolve_template(
    template: str, *, template_file: str | os.PathLike[str] | None = None
) -> Path:
    """The T1w file of a TemplateFlow template at 1 mm, or ``template_file`` when given.

    TemplateFlow is only read, never asked to download: a missing or empty
    (placeholder) file raises
    :class:`~cahal_bids.preprocessing.registration.RegistrationError` naming the template, the
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


def template_brain(
    template: str, head: str | os.PathLike[str], work_dir: str | os.PathLike[str]
) -> TemplateBrain:
    """The template's brain mask and brain-extracted head, derived once into the work folder.

    Written to ``<work_dir>/templates/`` and checked by sha256 on every later run
    (:func:`~cahal_bids.preprocessing.brain_template.brain_extracted_template`). MNI152
    templates take nilearn's MNI152NLin2009aSym brain mask as they are (same world
    space); any other template gets it by registering nilearn's MNI head first.
    """
    return brain_extracted_template(
        head,
        Path(work_dir) / 'templates',
        name=template,
        mni_space=template.startswith('MNI152'),
    )
