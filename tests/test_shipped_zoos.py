"""The zoos shipped with the package: intact, complete, documented, and safe on flat images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cahal_bids.grid import low_resolution_affine
from cahal_bids.inference import Enhancer
from cahal_bids.routing import CELLS, route
from cahal_bids.zoo import Zoo, ZooError, default_zoo_path

MODALITIES = ['T1w', 'FLAIR']


def _shipped(modality: str) -> Zoo:
    try:
        return Zoo.open(default_zoo_path(modality))
    except ZooError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize('modality', MODALITIES)
def test_shipped_zoo_is_complete_and_documented(modality):
    zoo = _shipped(modality)
    assert zoo.modality == modality
    assert zoo.trained_cells == set(CELLS)
    card = (zoo.path / 'MODEL_CARD.md').read_text()
    assert 'Data credits' in card and 'Validation' in card and 'cahal-eval' in card


def _flat_images() -> dict[str, np.ndarray]:
    shape = (64, 64, 16)
    x, y, _ = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing='ij')
    constant = np.full(shape, 100.0, dtype=np.float32)
    halves = np.where(x < 32, 80.0, 120.0).astype(np.float32)
    ramp = (60.0 + 0.5 * x + 0.25 * y).astype(np.float32)
    return {'constant': constant, 'two halves': halves, 'ramp': ramp}


@pytest.mark.slow
@pytest.mark.parametrize('modality', MODALITIES)
def test_no_detail_is_invented_on_flat_regions(modality, one_thread):
    """A featureless image comes back (almost) unchanged; next to sharp edges that need no
    restoration the experts may overshoot a little (measured in the model cards), but on
    average they leave such images alone."""
    enhancer = Enhancer(_shipped(modality), device=torch.device('cpu'))
    affine = low_resolution_affine(np.eye(4), (1.0, 1.0, 4.0))
    for name, low in _flat_images().items():
        restored, _, _ = enhancer.restore(low, affine, route((1.0, 1.0, 4.0)))
        upsampled = np.repeat(low, 4, axis=2)  # flat along z, so any interpolation gives this
        inner = (slice(8, -8), slice(8, -8), slice(8, -8))
        change = (np.abs(restored - upsampled) / np.abs(upsampled))[inner]
        if name == 'constant':
            assert float(change.max()) < 0.02, (modality, float(change.max()))
        else:
            assert float(change.mean()) < 0.015, (modality, name, float(change.mean()))
            assert float(np.percentile(change, 95)) < 0.06, (modality, name)
