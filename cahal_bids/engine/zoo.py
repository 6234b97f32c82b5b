"""Expert zoos: a folder of safetensors experts described by a checksummed manifest.

A zoo folder holds ``manifest.json`` and one ``<cell>.safetensors`` file per trained
expert. The manifest records the format version, the modality, the network
architecture, the intensity normalisation, the routing grid the experts were
trained for and, per cell, the expert's file, its sha256, parameter count,
training provenance and validation metrics.

Nothing is ever unpickled: weights are read as bytes, their sha256 compared with
the manifest, and only then parsed by ``safetensors``. A manifest whose file names
point outside the zoo folder is refused.

When a cell has no trained expert the nearest trained one along the training
curriculum is used (same anisotropy bin first, then the nearest volume bin,
preferring the simpler side); :class:`ExpertChoice` records that substitution so
it is reported, never silent.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cahal_bids.core.atomic import write_bytes_atomic
from cahal_bids.core.axis_order import validated_axis_order
from cahal_bids.core.errors import CahalError
from cahal_bids.core.hashing import file_sha256
from cahal_bids.core.routing import ANISOTROPY_BINS, CELLS, VOLUME_BINS
from cahal_bids.engine.patch_statistics import validated_norm_statistics

if TYPE_CHECKING:
    import torch

__all__ = [
    'MANIFEST_NAME',
    'ROUTED_MODALITIES',
    'SHIPPED_ZOOS',
    'ZOO_FORMAT_VERSION',
    'ExpertChoice',
    'Zoo',
    'ZooError',
    'default_zoo_path',
    'file_sha256',
    'grid_definition',
    'nearest_trained_cell',
    'read_manifest',
    'route_table_text',
    'serving_modalities',
    'write_zoo',
]

MANIFEST_NAME = 'manifest.json'
ZOO_FORMAT_VERSION = 1
SHIPPED_ZOOS: dict[str, str] = {
    'T1w': 't1w',
    # The FLAIR zoo (cahal_bids/zoos/flair, trained on two skull-stripped FLAIRs) lost to the
    # T1w zoo on every validation image (cahal-eval --routes, 18 cells, docs/evaluation.md),
    # its own contrast included: on the FLAIR of sub-stroke01 +1.24 dB over cubic B-spline
    # against +1.86; on the two T1w images -0.65 and -0.98 dB (two cells of the full-head one
    # below trilinear) against +1.78 and +1.66, the T1w zoo never below trilinear.
    # A FLAIR-specific zoo comes back only if it beats the T1w zoo on every validation image.
    # The T2w zoo does not beat it on the FLAIR either (+1.84 against +1.89 dB).
    'FLAIR': 't1w',
    # The T2w zoo: the T1w experts fine-tuned on the three T2w training volumes with contrast
    # augmentation. It beat the T1w zoo on both T2w validation images
    # (cahal-eval --routes, 18 cells, 3 acquisitions each; docs/evaluation.md): sub-arc2265
    # (full head) +1.55 dB over cubic B-spline against +1.16, sub-stroke01 +2.78
    # against +2.06, no cell of any validation image below trilinear.
    'T2w': 't2w',
}
"""The route table, contrast of an image (its BIDS suffix) -> folder under
``cahal_bids/zoos`` of the shipped zoo that restores it. The one place that says which
zoo serves which contrast; a zoo may serve a route other than its own modality only
through this table (:func:`serving_modalities`)."""
ROUTED_MODALITIES: tuple[str, ...] = tuple(SHIPPED_ZOOS)
"""The contrasts (BIDS suffixes) that have a route, i.e. that cahal-bids restores."""


class ZooError(CahalError):
    """A zoo is missing, malformed, or its weights do not match their checksums."""


def grid_definition() -> dict[str, Any]:
    """The routing grid as stored in a manifest (JSON-safe: the open end of V7 is null)."""
    return {
        'volume_bins_mm3': [
            [low, None if high == float('inf') else high] for low, high in VOLUME_BINS
        ],
        'anisotropy_bins': [list(bounds) for bounds in ANISOTROPY_BINS],
        'volume_bins_closed': 'left',
        'anisotropy_bins_closed': 'right',
        'cells': list(CELLS),
    }


def _cell_indices(cell: str) -> tuple[int, int]:
    return int(cell[1]), int(cell[3])


def nearest_trained_cell(cell: str, trained: set[str] | frozenset[str]) -> str:
    """The trained cell that stands in for ``cell``, following the curriculum.

    Order of preference: the cell itself; the same anisotropy bin at the nearest
    volume bin (the lower, simpler neighbour on ties); then the nearest anisotropy
    bin, again by volume distance.

    >>> nearest_trained_cell('V5A1', {'V1A3', 'V4A1', 'V6A1'})
    'V4A1'
    >>> nearest_trained_cell('V5A1', {'V1A3', 'V5A2'})
    'V5A2'
    """
    if cell not in CELLS:
        raise ValueError(f'unknown cell {cell!r}')
    if not trained:
        raise ZooError('the zoo has no trained expert at all')
    v0, a0 = _cell_indices(cell)

    def preference(candidate: str) -> tuple[int, int, int, int, int]:
        v, a = _cell_indices(candidate)
        return (int(a != a0), abs(a - a0), abs(v - v0), int(v > v0), int(a < a0))

    return min(sorted(trained), key=preference)


@dataclass(frozen=True)
class ExpertChoice:
    """Which expert serves a requested cell."""

    requested_cell: str
    cell: str
    file: str
    sha256: str

    @property
    def substituted(self) -> bool:
        """True when the requested cell had no trained expert of its own."""
        return self.cell != self.requested_cell


def _safe_member(root: Path, name: object, manifest: Path) -> Path:
    if not isinstance(name, str) or not name:
        raise ZooError(f'{manifest}: expert file name {name!r} is not a string')
    candidate = Path(name)
    if candidate.is_absolute() or '..' in candidate.parts or len(candidate.parts) != 1:
        raise ZooError(f'{manifest}: expert file {name!r} points outside the zoo folder')
    resolved = (root / candidate).resolve()
    if resolved.parent != root.resolve():
        raise ZooError(f'{manifest}: expert file {name!r} resolves outside the zoo folder')
    return root / candidate


def read_manifest(
    path: Path, *, what: str, format_version: int, error: type[CahalError]
) -> dict[str, Any]:
    """Read a JSON manifest of a weights folder and check its object type and format version.

    ``what`` names the folder kind in messages ('zoo', 'segmenter'); every problem
    raises ``error`` naming the file.
    """
    if not path.parent.is_dir():
        raise error(f'{path.parent}: {what} folder not found')
    try:
        manifest = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise error(f'{path}: {what} manifest not found') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f'{path}: unreadable {what} manifest ({problem})') from None
    if not isinstance(manifest, dict):
        raise error(f'{path}: the manifest must be a JSON object')
    if manifest.get('format_version') != format_version:
        raise error(
            f'{path}: unsupported {what} format_version '
            f'{manifest.get("format_version")!r} (this version reads {format_version})'
        )
    return manifest


@dataclass(frozen=True)
class Zoo:
    """An opened, verified zoo folder. Use :meth:`Zoo.open`."""

    path: Path
    manifest: dict[str, Any]
    experts: Mapping[str, Mapping[str, Any]] = field(repr=False)
    manifest_sha256: str = field(default='', repr=False)
    """sha256 of ``manifest.json`` as opened (it lists every expert's sha256: the zoo's id)."""

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = True) -> Zoo:
        """Read and check a zoo's manifest, and (by default) every expert's sha256."""
        root = Path(path)
        manifest_path = root / MANIFEST_NAME
        manifest = read_manifest(
            manifest_path, what='zoo', format_version=ZOO_FORMAT_VERSION, error=ZooError
        )
        for key in ('name', 'version', 'modality', 'architecture', 'normalization', 'experts'):
            if key not in manifest:
                raise ZooError(f'{manifest_path}: missing manifest field {key!r}')
        experts = manifest['experts']
        if not isinstance(experts, dict) or not experts:
            raise ZooError(f'{manifest_path}: "experts" must be a non-empty object')
        for cell, entry in experts.items():
            if cell not in CELLS:
                raise ZooError(f'{manifest_path}: unknown cell {cell!r} in "experts"')
            if not isinstance(entry, dict) or not isinstance(entry.get('sha256'), str):
                raise ZooError(f'{manifest_path}: expert {cell} has no sha256')
            member = _safe_member(root, entry.get('file'), manifest_path)
            if not member.is_file():
                raise ZooError(f'{member}: expert file for {cell} is missing')
            if verify and file_sha256(member) != entry['sha256']:
                raise ZooError(
                    f'{member}: sha256 does not match the manifest; the file is corrupted '
                    'or was replaced'
                )
        try:
            validated_norm_statistics(manifest.get('norm_statistics'), where=str(manifest_path))
            validated_axis_order(manifest.get('axis_order'), where=str(manifest_path))
        except ValueError as error:
            raise ZooError(str(error)) from None
        return cls(
            path=root,
            manifest=manifest,
            experts=experts,
            manifest_sha256=file_sha256(manifest_path),
        )

    @property
    def name(self) -> str:
        return str(self.manifest['name'])

    @property
    def version(self) -> str:
        return str(self.manifest['version'])

    @property
    def modality(self) -> str:
        return str(self.manifest['modality'])

    def check_serves(self, route: str) -> None:
        """Raise :class:`ZooError` unless this zoo may restore images of contrast ``route``.

        A zoo serves its own modality, and a route that the route table
        (:data:`SHIPPED_ZOOS`) lends to a zoo of its modality (:func:`serving_modalities`).
        """
        accepted = serving_modalities(route)
        if self.modality not in accepted:
            raise ZooError(
                f'{self.path}: this zoo was trained for {self.modality}, not {route} '
                f'(a {route} image is restored by a zoo trained for {" or ".join(accepted)})'
            )

    def record(self) -> dict[str, str]:
        """What a sidecar says about this zoo: name, version, modality, folder, manifest sha256."""
        return {
            'name': self.name,
            'version': self.version,
            'modality': self.modality,
            'path': str(self.path),
            'manifest_sha256': self.manifest_sha256,
        }

    @property
    def architecture(self) -> dict[str, Any]:
        return dict(self.manifest['architecture'])

    @property
    def normalization(self) -> dict[str, Any]:
        return dict(self.manifest['normalization'])

    @property
    def norm_statistics(self) -> dict[str, Any]:
        """How the experts' instance-norm statistics are obtained at inference."""
        return validated_norm_statistics(
            self.manifest.get('norm_statistics'), where=str(self.path / MANIFEST_NAME)
        )

    @property
    def axis_order(self) -> str:
        """``'as-acquired'`` or ``'thickest-last'`` (:mod:`cahal_bids.core.axis_order`)."""
        return validated_axis_order(
            self.manifest.get('axis_order'), where=str(self.path / MANIFEST_NAME)
        )

    @property
    def trained_cells(self) -> frozenset[str]:
        return frozenset(self.experts)

    def choose(self, cell: str) -> ExpertChoice:
        """The expert that serves ``cell`` (itself, or the nearest trained one)."""
        used = nearest_trained_cell(cell, self.trained_cells)
        entry = self.experts[used]
        return ExpertChoice(
            requested_cell=cell, cell=used, file=entry['file'], sha256=entry['sha256']
        )

    def load_state_dict(self, cell: str) -> dict[str, torch.Tensor]:
        """Weights of the expert trained for ``cell`` (exact cell), as float32 tensors.

        The bytes are hashed and compared with the manifest before safetensors
        parses them, so a file swapped after :meth:`open` is refused too.
        """
        import torch
        from safetensors.torch import load as load_safetensors

        entry = self.experts.get(cell)
        if entry is None:
            raise ZooError(f'{self.path}: no trained expert for cell {cell}')
        member = _safe_member(self.path, entry['file'], self.path / MANIFEST_NAME)
        payload = member.read_bytes()
        if hashlib.sha256(payload).hexdigest() != entry['sha256']:
            raise ZooError(
                f'{member}: sha256 does not match the manifest; the file is corrupted '
                'or was replaced'
            )
        try:
            tensors = load_safetensors(payload)
        except Exception as error:  # safetensors raises its own SafetensorError type
            raise ZooError(f'{member}: not a valid safetensors file ({error})') from None
        return {key: value.to(torch.float32) for key, value in tensors.items()}


def route_table_text() -> str:
    """The route table in words, for help texts: which shipped zoo restores each contrast.

    >>> route_table_text()
    'T1w by the T1w zoo, FLAIR by the T1w zoo, T2w by the T2w zoo'
    """
    # a shipped zoo's folder is its modality in lower case (t1w, flair, t2w)
    spelled = {route.lower(): route for route in ROUTED_MODALITIES}
    return ', '.join(
        f'{route} by the {spelled.get(SHIPPED_ZOOS[route], SHIPPED_ZOOS[route])} zoo'
        for route in ROUTED_MODALITIES
    )


def _shipped_folder(modality: str) -> Path:
    if modality not in SHIPPED_ZOOS:
        raise ZooError(
            f'{modality!r} has no route (no zoo restores it); the routed contrasts are '
            f'{", ".join(ROUTED_MODALITIES)}'
        )
    return Path(str(resources.files('cahal_bids').joinpath('zoos', SHIPPED_ZOOS[modality])))


def default_zoo_path(modality: str) -> Path:
    """The shipped zoo that restores images of contrast ``modality`` (:data:`SHIPPED_ZOOS`).

    ``'FLAIR'`` gives the T1w zoo, as the route table says.
    """
    path = _shipped_folder(modality)
    if not (path / MANIFEST_NAME).is_file():
        raise ZooError(
            f'no trained {modality} zoo is shipped with this version of cahal-bids '
            f'(looked in {path}); pass a zoo folder with --zoo PATH'
        )
    return path


def serving_modalities(route: str) -> tuple[str, ...]:
    """The zoo modalities (a manifest's ``modality``) allowed to restore ``route`` images.

    The route's own contrast first, then the modality of the shipped zoo that the route
    table (:data:`SHIPPED_ZOOS`) names for it: a FLAIR image may be restored by a T1w zoo
    because the table sends FLAIR to the T1w zoo, but a T1w image never by a FLAIR zoo. A
    contrast without a route is served only by a zoo of its own modality.

    >>> serving_modalities('FLAIR'), serving_modalities('T2w'), serving_modalities('T1w')
    (('FLAIR', 'T1w'), ('T2w',), ('T1w',))
    """
    accepted = [route]
    if route in SHIPPED_ZOOS:
        manifest = _shipped_folder(route) / MANIFEST_NAME
        try:
            content = json.loads(manifest.read_text(encoding='utf-8'))
        except (OSError, UnicodeDecodeError, ValueError):
            content = None  # no shipped zoo: only a zoo of the route's own contrast serves it
        lent = content.get('modality') if isinstance(content, dict) else None
        if isinstance(lent, str) and lent not in accepted:
            accepted.append(lent)
    return tuple(accepted)


def write_zoo(
    folder: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    modality: str,
    architecture: Mapping[str, Any],
    normalization: Mapping[str, Any],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    provenance: Mapping[str, Mapping[str, Any]] | None = None,
    validation: Mapping[str, Mapping[str, Any]] | None = None,
    storage_dtype: str = 'float32',
    norm_statistics: Mapping[str, Any] | None = None,
    axis_order: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a zoo folder: one safetensors file per expert, then the manifest.

    ``experts`` maps a cell name to a state dict. ``storage_dtype`` may be
    'float32', 'float16' or 'bfloat16' (weights are cast back to float32 on load).
    ``norm_statistics`` is the manifest entry of :mod:`cahal_bids.engine.patch_statistics`
    (e.g. ``PATCH_MEAN_DEFAULTS``); without it the zoo uses whole-volume statistics.
    ``axis_order`` is the manifest's :mod:`cahal_bids.core.axis_order` entry (None: as acquired).
    The manifest is written last and atomically, so a half-written zoo never
    opens.
    """
    import torch
    from safetensors.torch import save as save_safetensors

    dtypes = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
    if storage_dtype not in dtypes:
        raise ValueError(f'storage_dtype must be one of {sorted(dtypes)}, got {storage_dtype!r}')
    unknown = sorted(set(experts) - set(CELLS))
    if unknown:
        raise ValueError(f'unknown cells {unknown}; feasible cells are {list(CELLS)}')
    statistics = (
        None
        if norm_statistics is None
        else validated_norm_statistics(norm_statistics, where='write_zoo')
    )
    if axis_order is not None:
        validated_axis_order(axis_order, where='write_zoo')
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    for cell in CELLS:
        if cell not in experts:
            continue
        state = {
            key: value.detach().to('cpu', dtypes[storage_dtype]).contiguous()
            for key, value in experts[cell].items()
        }
        payload = save_safetensors(state, metadata={'cell': cell, 'modality': modality})
        file_name = f'{cell}.safetensors'
        write_bytes_atomic(root / file_name, payload)
        entries[cell] = {
            'file': file_name,
            'sha256': hashlib.sha256(payload).hexdigest(),
            'parameters': int(sum(value.numel() for value in state.values())),
            'provenance': dict((provenance or {}).get(cell, {})),
            'validation': dict((validation or {}).get(cell, {})),
        }
    manifest = {
        'format_version': ZOO_FORMAT_VERSION,
        'name': name,
        'version': version,
        'modality': modality,
        'architecture': dict(architecture),
        'normalization': dict(normalization),
        'storage_dtype': storage_dtype,
        **({} if statistics is None else {'norm_statistics': statistics}),
        **({} if axis_order is None else {'axis_order': axis_order}),
        'grid': grid_definition(),
        'experts': entries,
        **dict(extra or {}),
    }
    write_bytes_atomic(
        root / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=False) + '\n').encode()
    )
    return root
