"""BIDS input and output: find the images to enhance, name and describe the derivatives.

Reading datasets lives in :mod:`cahal_bids.core.bids_inputs` (re-exported here for
the app); this module names, describes and places the derivatives.

Everything here is plain Python over pybids and the file system; the Nipype
workflows and the command line call it, it knows nothing of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cahal_bids import __version__
from cahal_bids.core.atomic import write_json_atomic, write_text_atomic
from cahal_bids.core.bids_inputs import (
    DEFAULT_QUERIES,
    ENTITY_ABBREVIATIONS,
    NAME_ENTITIES,
    BIDSInputError,
    InputImage,
    collect_images,
    is_inside,
    load_bids_filters,
    read_layout,
    strip_subject_prefix,
)
from cahal_bids.engine.zoo import ROUTED_MODALITIES

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

MODALITIES = ROUTED_MODALITIES
"""The BIDS suffixes CAHAL enhances (those with a route to a shipped zoo)."""


CODE_URL = 'https://github.com/cahal-bids/cahal-bids'


def check_output_dir(bids_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> None:
    """Refuse an output folder equal to, or inside, the input dataset."""
    source = Path(bids_dir).resolve()
    target = Path(output_dir).resolve()
    if target == source or is_inside(target, source):
        raise BIDSInputError(
            f'{output_dir}: the output folder must be outside the input dataset {bids_dir} '
            '(cahal-bids never writes into the input dataset)'
        )


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
    parts = [
        f'{ENTITY_ABBREVIATIONS[name]}-{entities[name]}'
        for name in NAME_ENTITIES
        if entities.get(name)
    ]
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
