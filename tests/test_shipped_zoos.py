"""The zoos shipped with the package: intact, complete, documented, and safe on flat images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cahal_bids.core.routing import CELLS
from cahal_bids.engine.inference import Enhancer
from cahal_bids.engine.zoo import Zoo, ZooError, default_zoo_path
from cahal_bids.evaluation.flat_regions import flat_region_changes

MODALITIES = ['T1w', 'FLAIR', 'T2w']
"""The shipped zoos by the modality they were trained for (the FLAIR one is not routed,
:data:`~cahal_bids.engine.zoo.SHIPPED_ZOOS`, but still ships and must stay intact)."""
SEGMENTED = ['T1w', 'FLAIR']
"""The modalities a tissue segmenter ships for."""


def _shipped(modality: str) -> Zoo:
    folder = default_zoo_path('T1w').parent / modality.lower()
    try:
        return Zoo.open(folder)
    except ZooError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize('modality', MODALITIES)
def test_shipped_zoo_is_complete_and_documented(modality):
    zoo = _shipped(modality)
    assert zoo.modality == modality
    assert zoo.trained_cells == set(CELLS)
    card = (zoo.path / 'MODEL_CARD.md').read_text()
    assert 'Data credits' in card and 'Validation' in card and 'cahal-eval' in card
    # every image of the validation split, per image, and what chose between models
    assert '### Every validation image' in card and 'Model selection:' in card
    for image in ('sub-stroke01_T1w', 'sub-philips01_T1w', 'sub-stroke01_FLAIR',
                  'sub-stroke01_T2w', 'sub-arc2265_T2w'):  # fmt: skip
        assert f'| {image} |' in card, image


@pytest.mark.slow
@pytest.mark.parametrize('modality', MODALITIES)
def test_no_detail_is_invented_on_flat_regions(modality, one_thread):
    """A featureless image comes back (almost) unchanged; next to sharp edges that need no
    restoration the experts may overshoot a little (measured in the model cards), but on
    average they leave such images alone.

    At the default precision (bfloat16 on CPUs that compute it natively) the norms folded
    into the convolutions round a constant image's near-zero-variance features more
    coarsely: the FLAIR experts change it by up to 2.2 % there (1.9 % in float32).
    """
    enhancer = Enhancer(_shipped(modality), device=torch.device('cpu'))
    changes = flat_region_changes(enhancer)
    assert set(changes) == {'constant', 'two halves', 'ramp'}, changes
    for name, change in changes.items():
        if name == 'constant':
            assert change['mean_percent'] < 1.0, (modality, change)
            assert change['max_percent'] < 2.5, (modality, change)
        else:
            assert change['mean_percent'] < 1.5, (modality, name, change)
            assert change['p95_percent'] < 6.0, (modality, name, change)


@pytest.mark.parametrize('modality', SEGMENTED)
def test_shipped_segmenter_is_intact_validated_and_documented(modality):
    from cahal_bids.engine.segmenter import default_segmenter_path, load_segmenter, segment_volume

    path = default_segmenter_path(modality)
    if path is None:
        pytest.skip(f'no {modality} segmenter shipped')
    model = load_segmenter(path)
    assert model.class_names == ('background', 'CSF', 'GM', 'WM')
    manifest = json.loads((path / 'segmenter.json').read_text())
    assert manifest['modality'] == modality
    dice = manifest['validation']['dice'][f'sub-stroke01_{modality}']
    assert min(dice.values()) > 0.5
    card = (path / 'MODEL_CARD.md').read_text()
    assert 'Data credits' in card and f'{dice["WM"]:.3f}' in card
    labels = segment_volume(model, np.zeros((16, 16, 16), dtype=np.float32))
    assert labels.shape == (16, 16, 16) and labels.dtype == np.uint8
