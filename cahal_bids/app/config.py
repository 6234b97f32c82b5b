"""The configuration of one BIDS-App run, saved as TOML beside its work and its logs.

The command line fills a :class:`RunConfig`; only the top-level workflow builder
reads it (leaf workflow factories take explicit arguments). Saving it makes a run
reproducible: every option, the seed and the software versions are in one file.
"""

from __future__ import annotations

import json
import os
import tomllib
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cahal_bids import __version__
from cahal_bids.core.atomic import write_text_atomic
from cahal_bids.engine.consistency_guard import DEFAULT_PROJECTION
from cahal_bids.engine.zoo import ROUTED_MODALITIES

__all__ = ['RunConfig', 'dumps_toml', 'new_run_id']


def new_run_id() -> str:
    """A sortable, unique run identifier, e.g. ``20261125-031502_1a2b3c4d``."""
    now = datetime.now(UTC).strftime('%Y%m%d-%H%M%S')
    return f'{now}_{uuid.uuid4().hex[:8]}'


@dataclass
class RunConfig:
    """Every option of a ``cahal-bids`` run (paths are absolute)."""

    bids_dir: str
    output_dir: str
    analysis_level: str
    work_dir: str
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=lambda: list(ROUTED_MODALITIES))
    bids_filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip_bids_validation: bool = False
    bids_database_dir: str = ''
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float = 0.0
    plugin_file: str = ''
    device: str = 'auto'
    precision: str = 'auto'
    consistency_projection: str = DEFAULT_PROJECTION
    zoos: dict[str, str] = field(default_factory=dict)
    denoise: bool = True
    skip_registration: bool = False
    template: str = 'MNI152NLin2009cAsym'
    template_file: str = ''
    output_spaces: bool = False
    write_intermediate: bool = False
    sloppy: bool = False
    stop_on_first_crash: bool = False
    write_graph: bool = False
    random_seed: int = 0
    verbosity: int = 0
    run_id: str = field(default_factory=new_run_id)
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the configuration as TOML (atomically)."""
        content = self.to_dict()
        # PyBIDS filters may hold null (entity absent), which TOML cannot: keep them as JSON
        content['bids_filters'] = json.dumps(self.bids_filters, sort_keys=True)
        return write_text_atomic(path, dumps_toml({'cahal_bids': content}))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunConfig:
        """Read a configuration written by :meth:`save`."""
        content = tomllib.loads(Path(path).read_text())['cahal_bids']
        content['bids_filters'] = json.loads(content.get('bids_filters') or '{}')
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in content.items() if key in known})


def _toml_key(key: str) -> str:
    return key if key.replace('_', '').replace('-', '').isalnum() else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = (
        text.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n').replace('\t', '\\t')
    )
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return '[' + ', '.join(_toml_value(item) for item in value) + ']'
    if isinstance(value, dict):
        items = ', '.join(
            f'{_toml_key(str(k))} = {_toml_value(v)}' for k, v in value.items() if v is not None
        )
        return '{ ' + items + ' }' if items else '{}'
    if value is None:
        raise TypeError('TOML has no null; leave the key out')
    raise TypeError(f'cannot write {type(value).__name__} as TOML')


def dumps_toml(tables: dict[str, dict[str, Any]]) -> str:
    """TOML text for one level of tables of plain values (None values are left out).

    >>> print(dumps_toml({'run': {'seed': 1, 'labels': ['01'], 'cpu': True}}), end='')
    [run]
    seed = 1
    labels = ["01"]
    cpu = true
    """
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f'[{_toml_key(table)}]')
        lines.extend(
            f'{_toml_key(key)} = {_toml_value(value)}'
            for key, value in values.items()
            if value is not None
        )
    return '\n'.join(lines) + '\n'
