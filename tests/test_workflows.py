"""The runnable recipes in workflows/ work with the public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / 'workflows'


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
