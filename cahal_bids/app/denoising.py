"""Denoise an input image before enhancement (ANTs adaptive non-local means, Rician).

The filter that prepares the training ground truth
(:func:`~cahal_bids.preprocessing.denoising.nlm_denoise`),
applied on the image's own grid, inside a head mask estimated from intensities, so
the experts see inputs whose noise resembles what they were trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cahal_bids.core.nifti import load_image, save_image

__all__ = ['denoise_file']


def denoise_file(
    in_file: str | os.PathLike[str], out_file: str | os.PathLike[str], *, seed: int = 0
) -> Path:
    """Write the denoised copy of ``in_file`` (same grid, float32) to ``out_file``."""
    from cahal_bids.preprocessing.denoising import nlm_denoise
    from cahal_bids.preprocessing.masks import estimate_head_mask

    image = load_image(in_file)
    data = np.asarray(image.data, dtype=np.float32)
    mask = estimate_head_mask(data, image.voxel_sizes)
    if not mask.any():
        mask = None
    denoised = nlm_denoise(data, mask, image.voxel_sizes, seed=seed)
    return save_image(denoised, image.affine, out_file, header_like=image.header)
