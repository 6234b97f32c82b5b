"""The bridge to antspyx: images from arrays and affines, and reproducible seeds."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    import ants

__all__ = ['ants_image', 'ants_seed']


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


def ants_image(data: np.ndarray, affine: np.ndarray) -> ants.ANTsImage:
    """An ANTs image with the exact world geometry of ``affine`` (through nibabel)."""
    import ants

    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=float))
    image.header.set_xyzt_units(xyz='mm', t='sec')
    return ants.from_nibabel_nifti(image)
