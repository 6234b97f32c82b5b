"""The bridge to antspyx: images from arrays and affines, reproducible seeds, private
temporary files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    import ants

__all__ = ['ants_image', 'ants_seed', 'private_tempdir']


@contextlib.contextmanager
def ants_seed(seed: int) -> Iterator[None]:
    """Set ``ANTS_RANDOM_SEED`` for the ANTs calls inside the block, then restore it."""
    previous = os.environ.get('ANTS_RANDOM_SEED')
    os.environ['ANTS_RANDOM_SEED'] = str(int(seed) + 1)  # ANTs wants a non-zero seed
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop('ANTS_RANDOM_SEED', None)
        else:
            os.environ['ANTS_RANDOM_SEED'] = previous


@contextlib.contextmanager
def private_tempdir(prefix: str = 'cahal-ants-') -> Iterator[str]:
    """A temporary folder that ANTs' temporary files go to, deleted with them afterwards.

    Some antspyx calls (``ants.atropos``) name their outputs with ``tempfile.mktemp``
    in the system temporary folder and never remove them. Inside the block both
    ``TMPDIR`` and Python's :data:`tempfile.tempdir` point at a private folder, which
    is removed on exit; the previous values are restored. Like ``TMPDIR`` itself this
    is process-wide: do not run other work that writes temporary files in parallel
    threads of the same process.
    """
    previous_env = os.environ.get('TMPDIR')
    previous_tempdir = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        os.environ['TMPDIR'] = folder
        tempfile.tempdir = folder
        try:
            yield folder
        finally:
            tempfile.tempdir = previous_tempdir
            if previous_env is None:
                os.environ.pop('TMPDIR', None)
            else:
                os.environ['TMPDIR'] = previous_env


def ants_image(data: np.ndarray, affine: np.ndarray) -> ants.ANTsImage:
    """An ANTs image with the exact world geometry of ``affine`` (through nibabel)."""
    import ants

    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=float))
    image.header.set_xyzt_units(xyz='mm', t='sec')
    return ants.from_nibabel_nifti(image)
