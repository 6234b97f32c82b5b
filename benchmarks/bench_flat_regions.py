#!/usr/bin/env python
"""How much the shipped experts change featureless images (no detail to restore).

Three synthetic 1 x 1 x 4 mm images (a constant, two flat halves with one sharp in-plane
step, a gentle in-plane ramp) go through each shipped zoo's V4A1 expert; the relative
change from the (exact) trilinear input is reported away from the image borders.
Usage: ``python benchmarks/bench_flat_regions.py``
"""

from __future__ import annotations

import numpy as np
import torch

from cahal_bids.grid import low_resolution_affine
from cahal_bids.inference import Enhancer
from cahal_bids.routing import route
from cahal_bids.zoo import Zoo, default_zoo_path


def flat_images(shape=(64, 64, 16)) -> dict[str, np.ndarray]:
    x, y, _ = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing='ij')
    return {
        'constant': np.full(shape, 100.0, dtype=np.float32),
        'two halves': np.where(x < 32, 80.0, 120.0).astype(np.float32),
        'ramp': (60.0 + 0.5 * x + 0.25 * y).astype(np.float32),
    }


def main() -> None:
    torch.set_num_threads(1)
    affine = low_resolution_affine(np.eye(4), (1.0, 1.0, 4.0))
    print('| zoo | image | mean change | 95th percentile | max |')
    print('| --- | --- | ---: | ---: | ---: |')
    for modality in ('T1w', 'FLAIR'):
        enhancer = Enhancer(Zoo.open(default_zoo_path(modality)), device=torch.device('cpu'))
        for name, low in flat_images().items():
            restored, _, _ = enhancer.restore(low, affine, route((1.0, 1.0, 4.0)))
            upsampled = np.repeat(low, 4, axis=2)
            change = (np.abs(restored - upsampled) / np.abs(upsampled))[8:-8, 8:-8, 8:-8]
            print(
                f'| {modality} | {name} | {100 * change.mean():.2f} % | '
                f'{100 * np.percentile(change, 95):.2f} % | {100 * change.max():.2f} % |'
            )


if __name__ == '__main__':
    main()
