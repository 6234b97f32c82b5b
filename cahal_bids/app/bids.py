"""BIDS input and output: find the images to enhance, name and describe the derivatives.

Everything here is plain Python over pybids and the file system; the Nipype
workflows and the command line call it, it knows nothing of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cahal_bids import __version__
from cahal_bids.core.atomic import write_json_atomic, write_text_atomic
from cahal_bids.core.errors import CahalError

__all__ = [
    'DEFAULT_QUERIES',
    'MODALITIES',
    'BIDSInputError',
    'InputImage',
    'bids_uri',
    'check_output_dir',
    'collect_images',
    'derivative_name',
    'load_bids_filters',
    'read_layout',
    'strip_subject_prefix',
    'write_dataset_description',
]

MODALITIES = ('T1w', 'FLAIR')
"""The BIDS suffixes CAHAL enhances."""

DEFAULT_QUERIES: dict[str, dict[str, Any]] = {
    't1w': {'datatype': 'anat', 'suffix': 'T1w'},
    'flair': {'datatype': 'anat', 'suffix': 'FLAIR'},
}
"""PyBIDS queries per modality; ``--bids-filter-file`` entries update them."""

CODE_URL = 'https://github.com/cahal-bids/cahal-bids'

# Source entities kept in derivative names, in the order BIDS gives them.
_NAME_ENTITIES = (
    'subject',
    'session',
    'task',
    'acquisition',
    'ceagent',
    'reconstruction',
    'run',
    'part',
)
_SHORT = {
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


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def check_output_dir(bids_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> None:
    """Refuse an output folder equal to, or inside, the input dataset."""
    source = Path(bids_dir).resolve()
    target = Path(output_dir).resolve()
    if target == source or _is_inside(target, source):
        raise BIDSInputError(
            f'{output_dir}: the output folder must be outside the input dataset {bids_dir} '
            '(cahal-bids never writes into the input dataset)'
        )


def load_bids_filters(path: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """Read a ``--bids-filter-file``: JSON whose keys are query names (``t1w``, ``flair``)."""
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
        raise BIDSInputError(f'{file}: expected a JSON object with keys "t1w" and/or "flair"')
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
        if _is_inside(database.resolve(), root.resolve()):
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
    def key(self) -> str:
        """A short identifier usable as a Nipype node-name suffix."""
        parts = [
            f'{_SHORT[name]}{self.entities[name]}'
            for name in _NAME_ENTITIES[1:]
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
                    if name in _NAME_ENTITIES and value is not None
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


def strip_session_prefix(label: str) -> str:
    """``'ses-01'`` and ``'01'`` both give ``'01'``."""
    return label[4:] if label.startswith('ses-') else label


def derivative_name(
    entities: Mapping[str, str],
    suffix: str,
    *,
    extension: str = '.nii.gz',
    space: str | None = None,
    desc: str | None = None,
    extra: Sequence[tuple[str, str]] = (),
) -> str:
    """A BIDS-Derivatives file name keeping the source entities.

    >>> derivative_name({'subject': '01', 'session': 'a', 'run': '2'}, 'FLAIR', desc='cahal')
    'sub-01_ses-a_run-2_desc-cahal_FLAIR.nii.gz'
    >>> derivative_name({'subject': '01'}, 'xfm', extension='.txt',
    ...                 extra=[('from', 'T1w'), ('to', 'MNI152NLin2009cAsym'), ('mode', 'image')])
    'sub-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt'
    """
    parts = [f'{_SHORT[name]}-{entities[name]}' for name in _NAME_ENTITIES if entities.get(name)]
    if space:
        parts.append(f'space-{space}')
    parts.extend(f'{key}-{value}' for key, value in extra)
    if desc:
        parts.append(f'desc-{desc}')
    return '_'.join([*parts, suffix]) + extension


def derivative_folder(entities: Mapping[str, str]) -> Path:
    """``sub-<label>[/ses-<label>]/anat`` for the given source entities."""
    folder = Path(f'sub-{entities["subject"]}')
    if entities.get('session'):
        folder = folder / f'ses-{entities["session"]}'
    return folder / 'anat'


def bids_uri(relative_path: str, dataset: str = 'raw') -> str:
    """A BIDS URI for a file of a linked dataset.

    >>> bids_uri('sub-01/anat/sub-01_T1w.nii.gz')
    'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    """
    return f'bids:{dataset}:{relative_path}'


def write_dataset_description(
    output_dir: str | os.PathLike[str],
    *,
    bids_dir: str | os.PathLike[str],
    container: Mapping[str, str] | None = None,
) -> Path:
    """``dataset_description.json`` and ``.bidsignore`` of the derivatives folder."""
    target = Path(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    source = Path(bids_dir).resolve()
    source_name = None
    try:
        source_name = json.loads((source / 'dataset_description.json').read_text()).get('Name')
    except (OSError, ValueError):
        pass
    generated: dict[str, Any] = {
        'Name': 'cahal-bids',
        'Version': __version__,
        'CodeURL': CODE_URL,
        'Description': 'CAHAL: 1 mm native-space restoration of low-resolution T1w and FLAIR',
    }
    if container:
        generated['Container'] = dict(container)
    description = {
        'Name': f'cahal-bids outputs{f" of {source_name}" if source_name else ""}',
        'BIDSVersion': '1.9.0',
        'DatasetType': 'derivative',
        'GeneratedBy': [generated],
        'SourceDatasets': [{'URL': source.as_uri()}],
        'DatasetLinks': {'raw': str(source)},
        'HowToAcknowledge': 'Cite CAHAL and the tools listed in logs/CITATION.md.',
    }
    path = target / 'dataset_description.json'
    write_json_atomic(path, description)
    write_text_atomic(target / '.bidsignore', 'logs/\n*.html\nfigures/\ngroup_summary.tsv\n')
    return path


def container_from_environment() -> dict[str, str] | None:
    """The container the app runs in, from variables the recipes set (None outside one)."""
    image = os.environ.get('CAHAL_CONTAINER_IMAGE')
    if not image:
        return None
    return {'Type': os.environ.get('CAHAL_CONTAINER_TYPE', 'docker'), 'Tag': image}
