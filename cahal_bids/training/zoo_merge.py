"""Combine the experts of several zoos into one: the cells trained in separate runs.

Experts of one zoo are independent networks, so a zoo can be trained a few cells at a
time (two processes on a small machine, one Slurm task per cell on a cluster) and the
results combined afterwards. :func:`merge_zoos` takes zoos in order of precedence: a cell
gets the expert of the *last* zoo that has it, so ``merge_zoos([base, refined])``
replaces the refined cells of ``base`` and keeps the others.

Only zoos whose experts are used in the same way may be combined: same modality,
architecture, intensity normalisation, instance-norm statistics, axis order (the
manifest fields inference reads) and weight storage type. Expert files are copied byte
for byte, so their sha256 carry over; each expert's provenance gains the zoo it came
from, and the new manifest's ``training`` record lists the contributing zoos
(``merged_from``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cahal_bids.core.atomic import write_json_atomic
from cahal_bids.core.routing import CELLS
from cahal_bids.engine.zoo import MANIFEST_NAME, Zoo, ZooError, file_sha256, grid_definition

__all__ = ['MUST_AGREE', 'merge_zoos']

MUST_AGREE = (
    'modality',
    'architecture',
    'normalization',
    'norm_statistics',
    'axis_order',
    'storage_dtype',
)
"""Manifest fields every merged zoo must share: how an expert is stored and run."""


def _field(zoo: Zoo, key: str) -> Any:
    if key == 'norm_statistics':
        return zoo.norm_statistics
    if key == 'axis_order':
        return zoo.axis_order
    return zoo.manifest.get(key)


def _check_compatible(zoos: Sequence[Zoo]) -> None:
    first = zoos[0]
    for other in zoos[1:]:
        for key in MUST_AGREE:
            if _field(other, key) != _field(first, key):
                raise ZooError(
                    f'{other.path}: cannot be merged with {first.path}: their {key!r} '
                    f'differ ({_field(other, key)!r} vs {_field(first, key)!r})'
                )


def _runs(zoo: Zoo, cells: list[str]) -> list[dict[str, Any]]:
    """The training runs behind ``cells`` of ``zoo``: the zoo itself, or for a zoo that was
    merged before, its own runs (so merging merged zoos keeps one entry per run)."""
    training = zoo.manifest.get('training') or {}
    earlier = training.get('merged_from')
    if not earlier:
        return [
            {
                'zoo': f'{zoo.name} {zoo.version}',
                'cells': cells,
                'training_seconds': training.get('training_seconds'),
            }
        ]
    return [{**run, 'cells': [cell for cell in run['cells'] if cell in cells]} for run in earlier]


def merge_zoos(
    zoos: Sequence[Zoo],
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
) -> Path:
    """Write a zoo with, for each cell, the expert of the last zoo in ``zoos`` that has it.

    ``name`` and ``version`` default to those of the last zoo. The output folder must
    not be one of the inputs. Returns the output folder; its manifest is written last
    and atomically, so an interrupted merge never opens as a zoo.

    Raises
    ------
    ZooError
        Fewer than two zoos, zoos that run their experts differently, or an output
        folder that is one of the inputs.
    """
    if len(zoos) < 2:
        raise ZooError('merging needs at least two zoos')
    _check_compatible(zoos)
    root = Path(out_dir)
    for zoo in zoos:
        if root.resolve() == zoo.path.resolve():
            raise ZooError(f'{root}: the merged zoo cannot overwrite one of its inputs')
    source: dict[str, Zoo] = {}
    for zoo in zoos:
        for cell in zoo.trained_cells:
            source[cell] = zoo
    last = zoos[-1]
    root.mkdir(parents=True, exist_ok=True)
    stale = root / MANIFEST_NAME
    if stale.exists():
        stale.unlink()  # the folder is no zoo until the new manifest is in place
    experts: dict[str, dict[str, Any]] = {}
    for cell in (cell for cell in CELLS if cell in source):
        zoo = source[cell]
        entry = dict(zoo.experts[cell])
        target = root / f'{cell}.safetensors'
        shutil.copyfile(zoo.path / entry['file'], target)
        if file_sha256(target) != entry['sha256']:
            raise ZooError(f'{zoo.path / entry["file"]}: changed while it was being copied')
        provenance = dict(entry.get('provenance') or {})
        provenance['zoo'] = f'{zoo.name} {zoo.version}'
        experts[cell] = {**entry, 'file': target.name, 'provenance': provenance}
    contributions = [
        run for zoo in zoos for run in _runs(zoo, [c for c in CELLS if source.get(c) is zoo])
    ]
    training = dict(last.manifest.get('training') or {})
    training['training_seconds'] = round(
        sum(entry['training_seconds'] or 0.0 for entry in contributions if entry['cells']), 1
    )
    training['merged_from'] = [entry for entry in contributions if entry['cells']]
    manifest = {
        **last.manifest,
        'name': name or last.name,
        'version': version or last.version,
        'grid': grid_definition(),
        'experts': experts,
        'training': training,
    }
    write_json_atomic(stale, manifest)
    Zoo.open(root)  # what was written must open and verify
    return root
