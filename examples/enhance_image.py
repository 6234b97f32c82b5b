#!/usr/bin/env python
"""Recipe: enhance several images with one zoo, loading the experts once.

Uses only the public API (``from cahal_bids import Enhancer``); ``cahal-enhance`` does the
same for a single image. Usage::

    python examples/enhance_image.py ZOO OUT_DIR IMAGE [IMAGE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cahal_bids import Enhancer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('zoo', type=Path)
    parser.add_argument('out_dir', type=Path)
    parser.add_argument('images', type=Path, nargs='+')
    args = parser.parse_args()
    enhancer = Enhancer(args.zoo, device='auto')  # the zoo is opened (and checked) once
    for image in args.images:
        name = image.name.replace('.nii.gz', '').replace('.nii', '')
        result = enhancer.enhance_file(image, args.out_dir / f'{name}_desc-cahal.nii.gz')
        route = 'copied (already 1 mm)' if result.sidecar['skipped'] else result.sidecar['cell']
        print(f'{image} -> {result.output_path} [{route}]')


if __name__ == '__main__':
    main()
