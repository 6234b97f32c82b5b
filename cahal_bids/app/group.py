"""Group level: one row per enhanced image, gathered from the participant derivatives."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cahal_bids.core.atomic import write_text_atomic

__all__ = [
    'GROUP_COLUMNS',
    'collect_group_rows',
    'consistency_warnings',
    'registration_path',
    'registration_sidecar',
    'write_group_summary',
]

GROUP_COLUMNS = (
    'subject',
    'session',
    'modality',
    'file',
    'voxel_sizes',
    'V',
    'A',
    'cell',
    'expert',
    'skipped',
    'seconds',
    'registration_nmi_brain',
    'registration_threshold',
    'registration_doubtful',
    'registration_path',
    'consistency_rmse_cahal',
    'consistency_rmse_trilinear',
    'consistency_warning',
)
"""Columns of ``group_summary.tsv``. The registration columns describe the transform to the
template: normalised mutual information with the template inside its brain mask, the
threshold of the image's contrast, whether it is doubtful (below the threshold, or too
little of the brain in the field of view) and how it was obtained (``direct``,
``direct, brain-extracted`` or ``through T1w``)."""


def _entity(name: str, key: str) -> str:
    for part in name.split('_'):
        if part.startswith(f'{key}-'):
            return part[len(key) + 1 :]
    return ''


def _number(value: Any) -> str:
    return 'n/a' if value is None else f'{float(value):.4f}'


def registration_path(registration: dict[str, Any]) -> str:
    """How a template transform was obtained, in words, from its sidecar's record."""
    if registration.get('composed_through'):
        return f'through {registration["composed_through"]}'
    return 'direct, brain-extracted' if registration.get('brain_extracted') else 'direct'


def registration_sidecar(enhanced_sidecar: Path) -> Path | None:
    """The template transform's sidecar of an enhanced image's sidecar (None if absent)."""
    name = enhanced_sidecar.name
    stem, suffix = name[: -len('.json')].rsplit('_desc-cahal_', 1)
    matches = sorted(
        path
        for path in enhanced_sidecar.parent.glob(f'{stem}_from-{suffix}_to-*_xfm.json')
        if not path.name.endswith('_to-T1w_mode-image_xfm.json')
    )
    return matches[0] if matches else None


def _rmse(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return 'n/a' if value is None else f'{value:.4g}'


def consistency_warnings(
    output_dir: str | os.PathLike[str], subjects: Sequence[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """``(file, consistency record)`` of every enhanced image the consistency guard flagged.

    ``file`` is the image's path relative to ``output_dir``; ``subjects`` (labels without
    ``sub-``) narrows the search.
    """
    root = Path(output_dir)
    flagged = []
    for sidecar in sorted(root.glob('sub-*/**/anat/*_desc-cahal_*.json')):
        if '_space-' in sidecar.name or (
            subjects is not None and _entity(sidecar.name, 'sub') not in subjects
        ):
            continue
        try:
            record = json.loads(sidecar.read_text()).get('CAHAL', {}).get('consistency') or {}
        except (OSError, ValueError):
            continue
        if record.get('warning'):
            image = sidecar.relative_to(root).as_posix()[: -len('.json')] + '.nii.gz'
            flagged.append((image, record))
    return flagged


def collect_group_rows(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of ``group_summary.tsv``, sorted by file name."""
    rows = []
    for sidecar in sorted(Path(output_dir).glob('sub-*/**/anat/*_desc-cahal_*.json')):
        if '_space-' in sidecar.name:
            continue
        try:
            content = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        details = content.get('CAHAL', {})
        expert = details.get('expert') or {}
        registration: dict[str, Any] = {}
        xfm = registration_sidecar(sidecar)
        if xfm is not None:
            try:
                registration = json.loads(xfm.read_text()).get('Registration', {})
            except (OSError, ValueError):
                registration = {}
        quality = registration.get('quality', {})
        consistency = details.get('consistency') or {}
        rows.append({
            'subject': _entity(sidecar.name, 'sub'),
            'session': _entity(sidecar.name, 'ses') or 'n/a',
            'modality': sidecar.name[: -len('.json')].rsplit('_', 1)[-1],
            'file': sidecar.relative_to(output_dir).as_posix()[: -len('.json')] + '.nii.gz',
            'voxel_sizes': 'x'.join(f'{v:.3g}' for v in details.get('voxel_sizes', [])),
            'V': f'{details.get("V", float("nan")):.3f}',
            'A': f'{details.get("A", float("nan")):.3f}',
            'cell': details.get('cell') or 'n/a',
            'expert': expert.get('cell') or 'n/a',
            'skipped': bool(details.get('skipped')),
            'seconds': details.get('seconds', 'n/a'),
            'registration_nmi_brain': _number(quality.get('nmi_brain')),
            'registration_threshold': _number(quality.get('threshold')),
            'registration_doubtful': quality['doubtful'] if 'doubtful' in quality else 'n/a',
            'registration_path': registration_path(registration) if registration else 'n/a',
            'consistency_rmse_cahal': _rmse(consistency, 'rmse_cahal'),
            'consistency_rmse_trilinear': _rmse(consistency, 'rmse_trilinear'),
            'consistency_warning': (
                bool(consistency['warning']) if 'warning' in consistency else 'n/a'
            ),
        })  # fmt: skip
    return rows


def write_group_summary(output_dir: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Write ``group_summary.tsv`` (tab-separated, header row, ``n/a`` for missing values)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=GROUP_COLUMNS, delimiter='\t', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(Path(output_dir) / 'group_summary.tsv', buffer.getvalue())
