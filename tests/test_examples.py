"""The runnable recipes in examples/ work with the public API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import l1_loss

RECIPES = Path(__file__).resolve().parents[1] / 'examples'


def test_enhance_image_recipe(tmp_path, make_nifti, test_zoo):
    first = make_nifti(shape=(12, 10, 5), zooms=(1.0, 1.0, 4.0), name='a_T1w.nii.gz')
    second = make_nifti(shape=(8, 8, 8), zooms=(1.0, 1.0, 1.0), name='b_T1w.nii')
    result = subprocess.run(
        [
            sys.executable,
            str(RECIPES / 'enhance_image.py'),
            str(test_zoo),
            str(tmp_path / 'out'),
            str(first),
            str(second),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '[V4A1]' in result.stdout
    assert 'copied (already 1 mm)' in result.stdout
    assert (tmp_path / 'out' / 'a_T1w_desc-cahal.nii.gz').exists()
    assert (tmp_path / 'out' / 'b_T1w_desc-cahal.json').exists()


def test_enhance_wf_embeds_in_a_host_workflow(tmp_path, make_nifti, test_zoo):
    image = make_nifti(shape=(16, 14, 5), zooms=(1.0, 1.0, 4.0), name='sub-01_T1w.nii.gz')
    env = {**os.environ, 'NIPYPE_NO_ET': '1'}
    result = subprocess.run(
        [sys.executable, str(RECIPES / 'embed_enhance_wf.py'), str(image), str(test_zoo),
         str(tmp_path / 'work'), '--denoise'],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'shape (16, 14, 20), voxel sizes 1x1x1 mm' in result.stdout
    assert list((tmp_path / 'work' / 'host_wf' / 'cahal_enhance_wf').glob('denoise/*.nii.gz'))


def test_export_checkpoint_zoo_recipe(tmp_path):
    import numpy as np
    import torch

    from cahal_bids.engine.networks import ResidualUNet3D
    from cahal_bids.engine.zoo import Zoo
    from cahal_bids.physics.acquisition import CellSampler
    from cahal_bids.training.fit import TrainingSchedule, fit
    from cahal_bids.training.pairs import PairStream, TrainingVolume

    image = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    stream = PairStream([TrainingVolume(image=image, head_mask=image > 0.1, name='x')],
                        CellSampler('V2A3'), patch_size=8, batch_size=1, seed=0)  # fmt: skip
    network = ResidualUNet3D(levels=2, initial_filters=2)
    fit(network, stream, l1_loss, run_dir=tmp_path / 'run', schedule=TrainingSchedule(max_steps=1),
        progress=False)  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(RECIPES / 'export_checkpoint_zoo.py'), str(tmp_path / 'run'),
         str(tmp_path / 'zoo'), '--modality', 'FLAIR', '--name', 'g', '--levels', '2',
         '--filters', '2'],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    zoo = Zoo.open(tmp_path / 'zoo')
    assert zoo.modality == 'FLAIR' and zoo.trained_cells == {'V1A3'}
    exported = zoo.load_state_dict('V1A3')
    for key, value in network.state_dict().items():
        assert torch.equal(exported[key], value), key
