"""``cahal-eval`` end to end on a small skull-stripped phantom."""

from __future__ import annotations

import json

import numpy as np
import torch

from cahal_bids.cli import evaluate


def _brain(shape=(40, 44, 38)):
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij')
    radius = np.sqrt(sum(g**2 for g in grid))
    image = np.where(radius < 0.85, 60.0, 0.0) + np.where(radius < 0.55, 40.0, 0.0)
    image += 10 * np.sin(7 * grid[0]) * (radius < 0.85)
    return image.astype(np.float32)


def test_eval_writes_cases_and_tables(tmp_path, make_nifti, make_zoo, capsys):
    torch.set_num_threads(1)
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    zoo = make_zoo('identity', head_scale=0.0)
    out = tmp_path / 'eval'
    code = evaluate.main(
        [
            str(source),
            '--zoo',
            str(zoo),
            '--out',
            str(out),
            '--no-denoise',
            '--cells',
            'V3A2',
            'V6A1',
            '--realizations',
            '2',
            '--quiet',
            '--threads',
            '1',
        ]
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / 'cases.json').read_text())
    assert len(record['cases']) == 2 * 2 * 3
    assert {case['method'] for case in record['cases']} == {'trilinear', 'cubic', 'cahal'}
    assert record['zoo']['name'] == 'test-zoo'
    tables = (out / 'tables.md').read_text()
    assert '| cahal |' in tables and '| V6A1 |' in tables
    # an identity expert is exactly the trilinear reference
    overall = record['summary_psnr']['by_bin']['overall']
    assert abs(overall['cahal']['mean'] - overall['trilinear']['mean']) < 1e-3


def test_eval_rejects_unknown_cells(tmp_path, make_nifti, make_zoo, capsys):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0))
    code = evaluate.main(
        [str(source), '--zoo', str(make_zoo()), '--out', str(tmp_path), '--cells', 'V1A1']
    )
    assert code == 2
    assert 'unknown cells' in capsys.readouterr().err
