"""Read a preparation cache (written by ``cahal-train prepare``) as training inputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cahal_bids.training.pairs import TrainingVolume
from cahal_bids.training.preparation import METADATA_NAME, PreparationError, PreparedVolume

__all__ = ['find_prepared', 'load_labelled_volumes', 'load_training_volumes']


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
