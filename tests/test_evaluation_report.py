"""Figures and page of an evaluation run, from hand-made cases."""

from __future__ import annotations

import math

import numpy as np

from cahal_bids.evaluation.report import gain_grid, write_evaluation_report


def _case(cell, volume_bin, anisotropy_bin, method, psnr):
    return {'cell': cell, 'volume_bin': volume_bin, 'anisotropy_bin': anisotropy_bin,
            'method': method, 'psnr': psnr}  # fmt: skip


CASES = [
    _case('V1A3', 1, 3, 'trilinear', 30.0), _case('V1A3', 1, 3, 'cahal', 31.0),
    _case('V1A3', 1, 3, 'trilinear', 32.0), _case('V1A3', 1, 3, 'cahal', 34.0),
    _case('V4A1', 4, 1, 'trilinear', 25.0), _case('V4A1', 4, 1, 'cahal', 24.5),
    _case('V4A1', 4, 1, 'cubic', 26.0), _case('V4A2', 4, 2, 'cahal', math.inf),
]  # fmt: skip


def test_gain_grid_is_the_mean_difference_per_cell():
    grid = gain_grid(CASES)
    assert grid.shape == (7, 3)
    assert grid[0, 2] == 1.5  # (31 + 34) / 2 - (30 + 32) / 2
    assert grid[3, 0] == -0.5
    assert np.isnan(grid[3, 1])  # no finite case of the reference there
    assert np.isnan(grid[0, 0])  # infeasible cell


def test_report_writes_figures_and_a_page(tmp_path):
    tables = '| PSNR | 1-1.5 |\n| --- | ---: |\n| cahal | 32.5 |\n'
    page = write_evaluation_report(tmp_path, CASES, tables=tables, title='tiny <run>')
    text = page.read_text()
    for name in ('psnr_by_volume.png', 'gain_by_cell.png'):
        assert (tmp_path / name).read_bytes().startswith(b'\x89PNG')
        assert f'src="{name}"' in text
    assert '<td>32.5</td>' in text and 'tiny &lt;run&gt;' in text
