"""The preparation cache (written by ``cahal-train prepare``): its entries, read back as
training inputs.

Each entry is a folder ``cache_dir/<source stem>/`` holding the files of
:data:`OUTPUT_FILES` and :data:`METADATA_NAME`, written last (see
:mod:`cahal_bids.training.preparation`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cahal_bids.core.errors import InvalidImageError, PreprocessingError
from cahal_bids.training.pairs import TrainingVolume

__all__ = [
    'MANIFEST_NAME',
    'METADATA_NAME',
    'OUTPUT_FILES',
    'PreparationError',
    'PreparedVolume',
    'find_prepared',
    'load_labelled_volumes',
    'load_training_volumes',
    'read_metadata',
]

METADATA_NAME = 'prepared.json'

MANIFEST_NAME = 'manifest.json'

OUTPUT_FILES: dict[str, str] = {
    'image': 'image.nii.gz',
    'head_mask': 'head_mask.nii.gz',
    'brain_mask': 'brain_mask.nii.gz',
    'labels': 'labels.nii.gz',
}


class PreparationError(PreprocessingError):
    """Preparation cannot proceed (missing template, invalid arguments, bad dataset)."""


def _read_array(path: Path) -> np.ndarray:
    image = nib.load(path)
    if not isinstance(image, nib.Nifti1Image):
        raise InvalidImageError(path, 'not a NIfTI image')
    return np.asarray(image.dataobj)


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """The metadata of a cache entry, or None when it is missing or unreadable."""
    try:
        metadata = json.loads((folder / METADATA_NAME).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


@dataclass(frozen=True, eq=False)
class PreparedVolume:
    """A prepared ground-truth entry in the cache; arrays are read from disk on each call."""

    directory: Path
    metadata: Mapping[str, Any] = field(repr=False)
    from_cache: bool = False
    """Whether :func:`prepare_image` found this entry in the cache (nothing recomputed)."""

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> PreparedVolume:
        """Read a cache entry written by :func:`prepare_image`."""
        folder = Path(directory)
        metadata = read_metadata(folder)
        if metadata is None:
            raise PreparationError(f'{folder}: no readable {METADATA_NAME}, not a prepared entry')
        return cls(directory=folder, metadata=metadata)

    @property
    def source(self) -> Path:
        """The high-resolution image this entry was prepared from."""
        return Path(self.metadata['source'])

    @property
    def modality(self) -> str:
        return str(self.metadata['parameters']['modality'])

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world matrix of every stored image (1 mm, RAS voxel order)."""
        return np.asarray(self.metadata['grid']['affine'], dtype=np.float64)

    @property
    def scale(self) -> float:
        """The normalisation scale: stored image times ``scale`` gives the denoised intensities."""
        return float(self.metadata['normalization']['scale'])

    @property
    def image_path(self) -> Path:
        return self.directory / OUTPUT_FILES['image']

    @property
    def head_mask_path(self) -> Path:
        return self.directory / OUTPUT_FILES['head_mask']

    @property
    def brain_mask_path(self) -> Path:
        return self.directory / OUTPUT_FILES['brain_mask']

    @property
    def labels_path(self) -> Path:
        return self.directory / OUTPUT_FILES['labels']

    @property
    def metadata_path(self) -> Path:
        return self.directory / METADATA_NAME

    def image(self) -> np.ndarray:
        """The normalised 1 mm RAS image, float32."""
        return _read_array(self.image_path).astype(np.float32, copy=False)

    def labels(self) -> np.ndarray:
        """Tissue labels (:data:`LABELS`), uint8."""
        return _read_array(self.labels_path).astype(np.uint8, copy=False)

    def head_mask(self) -> np.ndarray:
        """Head mask, bool."""
        return _read_array(self.head_mask_path) > 0

    def brain_mask(self) -> np.ndarray:
        """Brain mask, bool."""
        return _read_array(self.brain_mask_path) > 0


def find_prepared(
    cache_dir: str | os.PathLike[str], *, modality: str | Sequence[str]
) -> list[PreparedVolume]:
    """Every prepared entry of ``modality`` (one or several) in ``cache_dir``, by folder name."""
    root = Path(cache_dir)
    wanted = (modality,) if isinstance(modality, str) else tuple(modality)
    if not root.is_dir():
        raise PreparationError(f'{root}: preparation cache not found')
    entries = [
        PreparedVolume.load(path.parent) for path in sorted(root.glob(f'*/{METADATA_NAME}'))
    ]
    chosen = [entry for entry in entries if entry.modality in wanted]
    if not chosen:
        raise PreparationError(
            f'{root}: no prepared {" or ".join(wanted)} image (run `cahal-train prepare`)'
        )
    return chosen


def _source_record(entry: PreparedVolume) -> dict[str, Any]:
    return {
        'entry': entry.directory.name,
        'source': str(entry.source),
        'sha256': entry.metadata.get('source_sha256'),
    }


def load_training_volumes(
    cache_dir: str | os.PathLike[str],
    *,
    modality: str | Sequence[str],
    brain_masks: bool = False,
) -> tuple[list[TrainingVolume], list[dict[str, Any]]]:
    """Ground truths for :class:`~cahal_bids.training.pairs.PairStream` and where they came from.

    ``modality`` may name several contrasts (a contrast-agnostic pool); ``brain_masks``
    also loads each brain mask (for head-coverage augmentation).
    """
    entries = find_prepared(cache_dir, modality=modality)
    volumes = [
        TrainingVolume(
            image=entry.image(),
            head_mask=entry.head_mask().astype(bool),
            name=entry.directory.name,
            brain_mask=entry.brain_mask().astype(bool) if brain_masks else None,
        )
        for entry in entries
    ]
    return volumes, [_source_record(entry) for entry in entries]


def load_labelled_volumes(
    cache_dir: str | os.PathLike[str], *, modality: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[dict[str, Any]]]:
    """(image, tissue labels) pairs for the segmenter, and where they came from."""
    entries = find_prepared(cache_dir, modality=modality)
    pairs = [(entry.image(), entry.labels()) for entry in entries]
    return pairs, [_source_record(entry) for entry in entries]
