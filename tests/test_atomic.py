"""Atomic writes: whole files only, ordinary permissions, nothing left on failure."""

from __future__ import annotations

import os
import stat

import pytest

from cahal_bids.core.atomic import atomic_path, write_json_atomic


def test_new_files_get_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / 'a.json', {'x': 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == '{\n  "x": 1\n}\n'


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / 'image.nii.gz'
    target.write_bytes(b'old')
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        assert temporary.name.endswith('.nii.gz') and temporary.name.startswith('.')
        temporary.write_bytes(b'half')
        raise RuntimeError('interrupted')
    assert target.read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['image.nii.gz']
