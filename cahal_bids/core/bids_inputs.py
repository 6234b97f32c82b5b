"""Reading BIDS datasets with PyBIDS: the layout, participant and session selection,
filter files, and the images to process. Read only: nothing is written into a dataset.

Used by the BIDS-App, by ``cahal-eval`` and by ground-truth preparation alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cahal_bids.core.errors import CahalError
from cahal_bids.core.modalities import MODALITIES

__all__ = [
    'DEFAULT_QUERIES',
    'ENTITY_ABBREVIATIONS',
    'NAME_ENTITIES',
    'BIDSInputError',
    'InputImage',
    'collect_images',
    'is_inside',
    'load_bids_filters',
    'read_layout',
    'strip_session_prefix',
    'strip_subject_prefix',
]


DEFAULT_QUERIES: dict[str, dict[str, Any]] = {
    't1w': {'datatype': 'anat', 'suffix': 'T1w'},
    'flair': {'datatype': 'anat', 'suffix': 'FLAIR'},
    't2w': {'datatype': 'anat', 'suffix': 'T2w'},
}
"""PyBIDS queries per modality; ``--bids-filter-file`` entries update them."""

# Source entities kept in derivative names, in the order BIDS gives them.
NAME_ENTITIES = (
    'subject',
    'session',
    'task',
    'acquisition',
    'ceagent',
    'reconstruction',
    'run',
    'part',
)

ENTITY_ABBREVIATIONS = {
    'subject': 'sub',
    'session': 'ses',
    'task': 'task',
    'acquisition': 'acq',
    'ceagent': 'ce',
    'reconstruction': 'rec',
    'run': 'run',
    'part': 'part',
}


class BIDSInputError(CahalError):
    """The input dataset, a label or a filter file cannot be used."""


def strip_subject_prefix(label: str) -> str:
    """``'sub-01'`` and ``'01'`` both give ``'01'``.

    >>> strip_subject_prefix('sub-p01'), strip_subject_prefix('p01')
    ('p01', 'p01')
    """
    return label[4:] if label.startswith('sub-') else label


def is_inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def strip_session_prefix(label: str) -> str:
    """``'ses-01'`` and ``'01'`` both give ``'01'``."""
    return label[4:] if label.startswith('ses-') else label


def load_bids_filters(path: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """Read a ``--bids-filter-file``: JSON whose keys are query names (``t1w``, ``flair``...)."""
    if path is None:
        return {}
    file = Path(path)
    try:
        content = json.loads(file.read_text())
    except FileNotFoundError:
        raise BIDSInputError(f'{file}: BIDS filter file not found') from None
    except (OSError, ValueError) as error:
        raise BIDSInputError(f'{file}: not a readable JSON file ({error})') from None
    if not isinstance(content, dict):
        raise BIDSInputError(
            f'{file}: expected a JSON object with keys among {", ".join(DEFAULT_QUERIES)}'
        )
    unknown = sorted(set(content) - set(DEFAULT_QUERIES))
    if unknown:
        raise BIDSInputError(
            f'{file}: unknown query names {unknown}; this app reads {sorted(DEFAULT_QUERIES)}'
        )
    for key, value in content.items():
        if not isinstance(value, dict):
            raise BIDSInputError(f'{file}: the "{key}" entry must be an object of BIDS entities')
    return content


def read_layout(
    bids_dir: str | os.PathLike[str],
    *,
    validate: bool = True,
    database_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Index ``bids_dir`` with pybids (read only), raising :class:`BIDSInputError` if invalid."""
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError

    root = Path(bids_dir)
    if not root.is_dir():
        raise BIDSInputError(f'{root}: the BIDS dataset folder does not exist')
    database = None
    if database_dir is not None:
        database = Path(database_dir)
        if is_inside(database.resolve(), root.resolve()):
            raise BIDSInputError(
                f'{database}: the BIDS database folder must be outside the input dataset'
            )
        database.mkdir(parents=True, exist_ok=True)
    try:
        return BIDSLayout(
            str(root),
            validate=validate,
            database_path=None if database is None else str(database),
        )
    except BIDSValidationError as error:
        raise BIDSInputError(f'{root}: not a valid BIDS dataset ({error})') from None


@dataclass(frozen=True)
class InputImage:
    """One image of the input dataset that the participant workflow processes."""

    path: Path
    modality: str
    subject: str
    entities: Mapping[str, str] = field(default_factory=dict)
    relative_path: str = ''

    @property
    def session(self) -> str | None:
        return self.entities.get('session')

    @property
    def suffix(self) -> str:
        """The BIDS suffix of the file (its contrast), whichever query selected it.

        >>> InputImage(path=Path('sub-01_acq-ax_PDw.nii.gz'), modality='T2w', subject='01').suffix
        'PDw'
        """
        stem = self.path.name.split('.', 1)[0]
        return stem.rsplit('_', 1)[-1]

    @property
    def key(self) -> str:
        """A short identifier usable as a Nipype node-name suffix."""
        parts = [
            f'{ENTITY_ABBREVIATIONS[name]}{self.entities[name]}'
            for name in NAME_ENTITIES[1:]
            if self.entities.get(name)
        ]
        text = '_'.join([self.modality.lower(), *parts])
        return ''.join(char if char.isalnum() or char == '_' else '_' for char in text)


def collect_images(
    layout: Any,
    *,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    modalities: Sequence[str] = MODALITIES,
    filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, list[InputImage]]:
    """The images to process, per subject label (sorted), as :class:`InputImage`.

    Raises :class:`BIDSInputError` when a requested participant is not in the
    dataset or when no image at all matches.
    """
    available = sorted(layout.get_subjects())
    if participant_labels:
        wanted = sorted({strip_subject_prefix(label) for label in participant_labels})
        missing = [label for label in wanted if label not in available]
        if missing:
            raise BIDSInputError(
                f'{layout.root}: participant(s) {", ".join("sub-" + m for m in missing)} not '
                f'found; the dataset has {", ".join("sub-" + a for a in available) or "none"}'
            )
    else:
        wanted = available
    images: dict[str, list[InputImage]] = {label: [] for label in wanted}
    for modality in modalities:
        query_name = modality.lower()
        query = dict(DEFAULT_QUERIES[query_name])
        query.update((filters or {}).get(query_name, {}))
        if session_labels:
            query['session'] = [strip_session_prefix(label) for label in session_labels]
        for label in wanted:
            files = layout.get(
                subject=label, extension=['.nii', '.nii.gz'], return_type='object', **query
            )
            for file in sorted(files, key=lambda f: f.path):
                entities = {
                    name: str(value)
                    for name, value in file.get_entities().items()
                    if name in NAME_ENTITIES and value is not None
                }
                images[label].append(
                    InputImage(
                        path=Path(file.path),
                        modality=modality,
                        subject=label,
                        entities=entities,
                        relative_path=Path(file.path).relative_to(Path(layout.root)).as_posix(),
                    )
                )
    images = {label: found for label, found in images.items() if found}
    if not images:
        raise BIDSInputError(
            f'{layout.root}: no {"/".join(modalities)} image matches the selection '
            f'(participants: {", ".join(wanted) or "none"})'
        )
    return images
