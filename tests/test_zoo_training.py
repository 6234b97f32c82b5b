"""Training a (tiny) zoo end to end: generalist, curriculum, manifest, resumption."""

from __future__ import annotations

import json
import os
import signal
import threading

import numpy as np
import pytest
import torch

from cahal_bids.engine.patch_statistics import PATCH_MEAN_DEFAULTS
from cahal_bids.engine.zoo import MANIFEST_NAME, Zoo
from cahal_bids.training.fit import TrainingInterrupted
from cahal_bids.training.pairs import TrainingVolume
from cahal_bids.training.zoo_training import ZooTrainingConfig, train_zoo

from helpers import l1_loss

pytestmark = pytest.mark.usefixtures('one_thread')


def _volume():
    rng = np.random.default_rng(0)
    image = rng.random((28, 28, 28)).astype(np.float32)
    return TrainingVolume(image=image, head_mask=image > 0.1, name='noise')


def _tiny_config(**options):
    """A zoo configuration small enough to train in a test: 2 levels, 2 filters, 8^3 patches."""
    return ZooTrainingConfig(
        **{'levels': 2, 'initial_filters': 2, 'patch_size': 8, 'batch_size': 1, **options}
    )


def test_tiny_zoo_follows_the_curriculum_and_resumes(tmp_path):
    config = _tiny_config(generalist_steps=3, steps_per_expert=2, cells=('V2A3', 'V1A3', 'V2A2'))
    options = dict(
        out_dir=tmp_path / 'zoo',
        work_dir=tmp_path / 'runs',
        config=config,
        loss_fn=l1_loss,
        device=torch.device('cpu'),
        data_sources=[{'entry': 'noise'}],
        progress=False,
    )
    path = train_zoo([_volume()], **options)
    zoo = Zoo.open(path)
    assert zoo.trained_cells == {'V1A3', 'V2A3', 'V2A2'}
    provenance = {cell: zoo.experts[cell]['provenance'] for cell in zoo.trained_cells}
    assert provenance['V1A3']['initialised_from'] == 'generalist trained on every cell'
    assert provenance['V2A3']['initialised_from'] == 'expert V1A3 (curriculum parent)'
    assert provenance['V2A2']['initialised_from'] == 'expert V2A3 (curriculum parent)'
    assert all(entry['steps'] == 2 for entry in provenance.values())
    assert all(entry['precision'] == 'fp32' for entry in provenance.values())
    assert zoo.manifest['training']['precision'] == 'fp32'
    assert zoo.manifest['training']['data'] == [{'entry': 'noise'}]
    # inference normalises as training did: patches of the training size
    assert zoo.norm_statistics == {
        **PATCH_MEAN_DEFAULTS,
        'patch_size': zoo.manifest['training']['patch_size'],
    }
    first = zoo.load_state_dict('V2A2')
    # a rerun finds every run finished and writes the same experts
    again = Zoo.open(train_zoo([_volume()], **options)).load_state_dict('V2A2')
    for key, value in first.items():
        assert torch.equal(value, again[key])


def test_warm_start_continues_a_generalist_from_a_zoo(tmp_path):
    config = _tiny_config(
        generalist_steps=2, steps_per_expert=1, cells=('V1A3',), lr_schedule='cosine'
    )
    common = dict(config=config, loss_fn=l1_loss, device=torch.device('cpu'), progress=False)
    first = Zoo.open(train_zoo([_volume()], out_dir=tmp_path / 'a', work_dir=tmp_path / 'ra',
                               **common))  # fmt: skip
    second = Zoo.open(
        train_zoo(
            [_volume()],
            out_dir=tmp_path / 'b',
            work_dir=tmp_path / 'rb',
            warm_start=first,
            **common,
        )  # fmt: skip
    )
    assert second.manifest['training']['warm_start'] == f'{first.name} {first.version}'
    assert second.manifest['training']['lr_schedule'] == 'cosine'
    a, b = first.load_state_dict('V1A3'), second.load_state_dict('V1A3')
    assert any(not torch.equal(a[key], b[key]) for key in a)  # it trained further


def test_same_cell_fine_tuning_starts_each_expert_from_its_own_cell(tmp_path):
    common = dict(loss_fn=l1_loss, device=torch.device('cpu'), progress=False)
    cells = ('V1A3', 'V2A3')
    first = Zoo.open(
        train_zoo(
            [_volume()],
            out_dir=tmp_path / 'a',
            work_dir=tmp_path / 'ra',
            config=_tiny_config(generalist_steps=1, steps_per_expert=1, cells=cells),
            **common,
        )
    )
    config = _tiny_config(
        steps_per_expert=1,
        cells=cells,
        init_from='same-cell',
        contrast_augmentation=1.0,
        head_coverage_augmentation=0.5,
        contrasts=('T1w', 'T2w'),
    )
    second = Zoo.open(
        train_zoo(
            [_volume()],
            out_dir=tmp_path / 'b',
            work_dir=tmp_path / 'rb',
            config=config,
            init_zoo=first,
            **common,
        )
    )
    provenance = {cell: second.experts[cell]['provenance'] for cell in cells}
    assert provenance['V2A3']['initialised_from'] == f'{first.name} {first.version} expert V2A3'
    training = second.manifest['training']
    assert training['init_from'] == 'same-cell' and training['contrasts'] == ['T1w', 'T2w']
    assert training['contrast_augmentation'] == 1.0
    with pytest.raises(ValueError, match='init_from'):
        _tiny_config(init_from='parent')


def test_a_stop_request_ends_the_whole_zoo_run_and_a_rerun_resumes(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip('fit only catches SIGTERM in the main thread')
    config = _tiny_config(generalist_steps=5, steps_per_expert=2, cells=('V1A3', 'V2A3'))
    calls = []

    def stopping_l1(prediction, target):
        calls.append(1)
        if len(calls) == 2:  # during the generalist's second step
            os.kill(os.getpid(), signal.SIGTERM)
        return l1_loss(prediction, target)

    common = dict(config=config, device=torch.device('cpu'), progress=False)
    runs, out = tmp_path / 'runs', tmp_path / 'zoo'
    with pytest.raises(TrainingInterrupted, match='generalist') as caught:
        train_zoo([_volume()], out_dir=out, work_dir=runs, loss_fn=stopping_l1, **common)
    assert caught.value.step == 2 and caught.value.run_dir == runs / 'generalist'
    assert not (out / MANIFEST_NAME).exists()
    state = json.loads((runs / 'generalist' / 'checkpoint.json').read_text())
    assert state['step'] == 2
    assert not (runs / 'V1A3').exists()  # no expert started from the unfinished generalist

    resumed = Zoo.open(
        train_zoo([_volume()], out_dir=out, work_dir=runs, loss_fn=l1_loss, **common)
    )
    assert json.loads((runs / 'generalist' / 'checkpoint.json').read_text())['step'] == 5
    assert resumed.trained_cells == {'V1A3', 'V2A3'}
    # the same zoo as a run that was never interrupted
    whole = Zoo.open(
        train_zoo(
            [_volume()], out_dir=tmp_path / 'whole', work_dir=tmp_path / 'wr', loss_fn=l1_loss,
            **common,
        )
    )  # fmt: skip
    for cell in ('V1A3', 'V2A3'):
        a, b = resumed.load_state_dict(cell), whole.load_state_dict(cell)
        assert all(torch.equal(a[key], b[key]) for key in a), cell


def test_thickest_last_training_writes_the_axis_order(tmp_path):
    config = _tiny_config(
        generalist_steps=1, steps_per_expert=1, cells=('V1A3',), axis_order='thickest-last'
    )
    path = train_zoo(
        [_volume()],
        out_dir=tmp_path / 'zoo',
        work_dir=tmp_path / 'runs',
        config=config,
        loss_fn=l1_loss,
        device=torch.device('cpu'),
        progress=False,
    )
    zoo = Zoo.open(path)
    assert zoo.axis_order == 'thickest-last'
    assert zoo.manifest['training']['axis_order'] == 'thickest-last'
    assert ZooTrainingConfig().axis_order == 'thickest-last'  # the default since zoo 0.4
    with pytest.raises(ValueError, match='axis_order'):
        ZooTrainingConfig(axis_order='slices-first')


def test_training_precision_is_fp32_or_bf16():
    assert ZooTrainingConfig(precision='bf16').precision == 'bf16'
    with pytest.raises(ValueError, match='precision'):
        ZooTrainingConfig(precision='auto')  # the CLI resolves auto before it gets here
