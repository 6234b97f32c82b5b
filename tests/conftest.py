"""Shared fixtures: tiny synthetic NIfTI files and zoos written into ``tmp_path``.

``make_nifti(...)`` writes a valid image (any shape, voxel sizes, affine, dtype,
NIfTI-1 or NIfTI-2, separate qform/sform) and returns its path;
``helpers.patch_nifti_header(path, **fields)`` then rewrites raw header fields in place
(bypassing nibabel's consistency fixes) to make deliberately broken files.
``make_affine(...)`` builds permuted, flipped and oblique affines (session-scoped,
so it can be used inside hypothesis tests). ``make_zoo``/``test_zoo`` write tiny
random-weight zoos, ``shared_data`` is the real-scan folder (or a skip) and
``one_thread`` runs a test with one intra-op torch thread.

Plain functions shared by tests live in ``helpers.py``; tests import them directly
(``from helpers import ...``; ``tests/`` is on ``sys.path`` through pytest's ``pythonpath``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest

from helpers import (
    SHARED_DATA,
    build_affine,
    centred_affine,
    patch_nifti_header,
    write_test_zoo,
)


@pytest.fixture(scope='session')
def make_affine() -> Callable[..., np.ndarray]:
    """:func:`helpers.build_affine`: permuted, flipped, oblique voxel-to-world matrices."""
    return build_affine


@pytest.fixture
def make_nifti(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a small synthetic NIfTI image into ``tmp_path``; returns its path.

    Arguments (all optional): ``shape`` (default ``(8, 9, 10)``; ignored when
    ``data`` is given), ``zooms`` (default ``(1, 1, 3)``, used when ``affine`` is
    None to build a centred RAS affine), ``affine``, ``data`` (default:
    reproducible uniform noise in [0, 100)), ``name`` (``'img.nii.gz'``; the
    extension chooses compression), ``dtype`` (on-disk type, default float32),
    ``nifti2``, ``qform_affine`` (default ``affine``), ``qform_code`` and
    ``sform_code`` (default 1; 0 leaves that transform unset), ``header_edits``
    (raw fields patched after writing, see :func:`helpers.patch_nifti_header`) and
    ``folder`` (default ``tmp_path``).
    """

    def _make(
        shape: Sequence[int] = (8, 9, 10),
        zooms: Sequence[float] = (1.0, 1.0, 3.0),
        affine: npt.ArrayLike | None = None,
        data: npt.ArrayLike | None = None,
        name: str = 'img.nii.gz',
        *,
        dtype: npt.DTypeLike = np.float32,
        nifti2: bool = False,
        qform_affine: npt.ArrayLike | None = None,
        qform_code: int = 1,
        sform_code: int = 1,
        header_edits: dict[str, Any] | None = None,
        folder: Path | None = None,
    ) -> Path:
        if data is None:
            rng = np.random.default_rng(0)
            array = (rng.random(tuple(shape)) * 100).astype(dtype)
        else:
            array = np.asarray(data)
            if array.dtype.fields is None:
                array = array.astype(dtype)
        shape = array.shape
        if affine is None:
            matrix = centred_affine((*shape, 1, 1, 1)[:3], zooms)
        else:
            matrix = np.asarray(affine, dtype=float)
        image_class = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        image = image_class(array, matrix)
        image.header.set_data_dtype(array.dtype)
        image.set_sform(matrix, code=sform_code)
        image.set_qform(
            matrix if qform_affine is None else np.asarray(qform_affine), code=qform_code
        )
        image.header.set_xyzt_units(xyz='mm')
        path = (tmp_path if folder is None else folder) / name
        nib.save(image, path)
        if header_edits:
            patch_nifti_header(path, **header_edits)
        return path

    return _make


@pytest.fixture
def test_zoo(tmp_path: Path) -> Path:
    """A T1w zoo of random tiny experts for every cell."""
    return write_test_zoo(tmp_path / 'zoo')


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder, or skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'{SHARED_DATA} is absent')
    return SHARED_DATA


@pytest.fixture
def make_zoo(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_zoo('name', cells=..., head_scale=...)`` writes a tiny test zoo."""

    def _make(name: str = 'zoo', **options: Any) -> Path:
        return write_test_zoo(tmp_path / name, **options)

    return _make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread: tiny convolutions run ~10x faster so on a busy 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
