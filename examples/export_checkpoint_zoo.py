#!/usr/bin/env python
"""Recipe: export a training checkpoint (e.g. a generalist) as a one-expert zoo.

The expert is stored under V1A3, so every cell falls back to it (and the sidecar says
so); ``cahal-train fit --warm-start ZOO`` starts a new generalist from it. Usage::

    python examples/export_checkpoint_zoo.py RUN_DIR OUT_ZOO --modality T1w \\
        --name cahal-t1w-generalist --levels 4 --filters 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from cahal_bids.core.normalization import DEFAULT_NORMALIZATION
from cahal_bids.engine.networks import ResidualUNet3D
from cahal_bids.engine.patch_statistics import PATCH_MEAN_DEFAULTS
from cahal_bids.engine.zoo import write_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('run_dir', type=Path, help='a fit run folder (checkpoint.safetensors)')
    parser.add_argument('out', type=Path)
    parser.add_argument('--modality', choices=('T1w', 'FLAIR'), required=True)
    parser.add_argument('--name', required=True)
    parser.add_argument('--version', default='dev')
    parser.add_argument('--levels', type=int, default=4)
    parser.add_argument('--filters', type=int, default=8)
    args = parser.parse_args()
    tensors = load_file(args.run_dir / 'checkpoint.safetensors')
    state = {key[len('model.') :]: value for key, value in tensors.items()
             if key.startswith('model.')}  # fmt: skip
    meta = json.loads((args.run_dir / 'checkpoint.json').read_text())
    network = ResidualUNet3D(levels=args.levels, initial_filters=args.filters)
    network.load_state_dict(state)
    write_zoo(
        args.out,
        name=args.name,
        version=args.version,
        modality=args.modality,
        architecture={'name': 'ResidualUNet3D', 'config': network.config()},
        normalization=DEFAULT_NORMALIZATION,
        experts={'V1A3': state},
        norm_statistics=PATCH_MEAN_DEFAULTS,
        provenance={'V1A3': {'note': 'checkpoint exported as a one-expert zoo',
                             'steps': meta['step'], 'seconds': round(meta['seconds'], 1)}},
    )  # fmt: skip
    print(f'{args.out}: step {meta["step"]}')


if __name__ == '__main__':
    main()
