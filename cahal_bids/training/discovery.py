"""Which high-resolution images of a BIDS dataset to prepare as ground truth (PyBIDS)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cahal_bids.core.bids_inputs import BIDSInputError, read_layout
from cahal_bids.core.modalities import MODALITIES
from cahal_bids.core.nifti import NIFTI_SUFFIXES
from cahal_bids.training.prepared import PreparationError

__all__ = ['VALIDATION_SUBJECTS', 'find_images']

VALIDATION_SUBJECTS = ('stroke01', 'philips01', 'arc2265')
"""The validation split of ``../shared/data/hr`` (its README): excluded from preparation
unless asked for, so that no model is ever trained on an image that chooses between models."""


def _subject_label(label: str) -> str:
    return label[4:] if label.startswith('sub-') else label


def find_images(
    bids_dir: str | os.PathLike[str],
    *,
    modality: str,
    subjects: Iterable[str] | None = None,
    exclude_subjects: Iterable[str] = VALIDATION_SUBJECTS,
) -> list[Path]:
    """The ``anat`` images of suffix ``modality`` in a BIDS folder (PyBIDS), sorted.

    ``subjects`` and ``exclude_subjects`` take labels with or without ``sub-``.
    A subject both requested and excluded is an error (the validation subjects,
    :data:`VALIDATION_SUBJECTS`, are excluded by default; pass ``exclude_subjects=()`` to
    prepare them).
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
    try:
        layout = read_layout(root, validate=False)
    except BIDSInputError as error:
        raise PreparationError(str(error)) from None
    present = set(layout.get_subjects())
    if wanted is not None and (missing := sorted(wanted - present)):
        raise PreparationError(
            f'{root}: no such subject folder: {", ".join(f"sub-{s}" for s in missing)}'
        )
    chosen = sorted(label for label in (wanted or present) if label not in excluded)
    if not chosen:
        return []
    files = layout.get(
        subject=chosen,
        datatype='anat',
        suffix=modality,
        extension=list(NIFTI_SUFFIXES),
        return_type='filename',
    )
    return sorted(Path(name) for name in files)
