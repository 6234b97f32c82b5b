#!/usr/bin/env python
"""How much the shipped experts change featureless images (no detail to restore).

The three 1 x 1 x 4 mm images of :mod:`cahal_bids.evaluation.flat_regions` (a constant, two flat
halves with one sharp in-plane step, a gentle in-plane ramp) go through each shipped
zoo's V4A1 expert, small (64 x 64 x 16) and at a full head's size (192 x 224 x 48);
the relative change from the (exact) trilinear input is reported away from the borders.
Usage: ``python benchmarks/bench_flat_regions.py``
"""

from __future__ import annotations

import torch

from cahal_bids.engine.inference import Enhancer
from cahal_bids.engine.zoo import Zoo, default_zoo_path
from cahal_bids.evaluation.flat_regions import flat_region_changes


def main() -> None:
    torch.set_num_threads(1)
    print('| zoo | size | image | mean change | 95th percentile | max |')
    print('| --- | --- | --- | ---: | ---: | ---: |')
    for modality in ('T1w', 'FLAIR'):
        enhancer = Enhancer(Zoo.open(default_zoo_path(modality)), device=torch.device('cpu'))
        for shape in ((64, 64, 16), (192, 224, 48)):
            size = 'x'.join(str(n) for n in shape)
            for name, change in flat_region_changes(enhancer, shape).items():
                print(
                    f'| {modality} | {size} | {name} | {change["mean_percent"]:.2f} % | '
                    f'{change["p95_percent"]:.2f} % | {change["max_percent"]:.2f} % |'
                )


if __name__ == '__main__':
    main()
