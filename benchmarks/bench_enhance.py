"""Speed and peak memory of ``cahal-enhance`` next to a SynthSR-sized U-Net forward pass.

The input is a 200 x 200 x 50 image at 1 x 1 x 4 mm (made from nilearn's MNI template
with the project's degradation model), so the output is 200 x 200 x 200. Both are run
in fresh subprocesses on the same machine in the same invocation:

* ``cahal-enhance`` end to end (load, route, resample, one expert, write), with a zoo
  of the chosen width (weights do not change the cost);
* the forward pass alone of a SynthSR-sized U-Net (24 initial features doubled per
  level, 5 levels, 2 convolutions per level, ELU) on the same 200^3 grid.

Peak memory is each subprocess's maximum resident set size. Prints a Markdown table.

Usage::

    python benchmarks/bench_enhance.py --filters 16 --threads 2 [--device cpu|cuda] \
        [--consistency-projection off|adaptive|exact]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYNTHSR_SNIPPET = r"""
import resource, sys, time, torch
from torch import nn
torch.set_num_threads(int(sys.argv[1]))
device = torch.device(sys.argv[2])

def block(cin, cout):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.ELU(),
                         nn.Conv3d(cout, cout, 3, padding=1), nn.ELU())

class SynthSRUNet(nn.Module):
    def __init__(self, features=24, levels=5):
        super().__init__()
        widths = [features * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList(
            block(1 if i == 0 else widths[i - 1], w) for i, w in enumerate(widths))
        self.up = nn.ModuleList(nn.Upsample(scale_factor=2, mode='nearest') for _ in widths[:-1])
        self.dec = nn.ModuleList(
            block(widths[i] + widths[i + 1], widths[i]) for i in range(levels - 1))
        self.head = nn.Conv3d(widths[0], 1, 1)
        self.pool = nn.MaxPool3d(2)
    def forward(self, x):
        skips = []
        for enc in self.down[:-1]:
            x = enc(x); skips.append(x); x = self.pool(x)
        x = self.down[-1](x)
        for i in reversed(range(len(self.dec))):
            x = self.dec[i](torch.cat([skips[i], self.up[i](x)], 1))
        return self.head(x)

net = SynthSRUNet().to(device).eval()
x = torch.rand(1, 1, 208, 208, 208, device=device)  # 200^3 padded to a multiple of 16
with torch.inference_mode():
    start = time.perf_counter()
    net(x)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _run(command: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    # the largest RSS of any child so far: exact for the first child run
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kib / 1024**2, result.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--filters', type=int, default=16)
    parser.add_argument('--levels', type=int, default=4)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--precision',
        choices=('auto', 'fp32', 'bf16'),
        default='auto',
        help="the expert's arithmetic (default auto, as cahal-enhance)",
    )
    parser.add_argument('--zoo', type=Path, help='a real zoo instead of random weights')
    parser.add_argument(
        '--consistency-projection',
        choices=('off', 'adaptive', 'exact'),
        default=None,
        help="what follows the expert (default: cahal-enhance's own default)",
    )
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from cahal_bids.core.grid import low_resolution_affine
    from cahal_bids.core.nifti import save_image
    from cahal_bids.core.normalization import DEFAULT_NORMALIZATION
    from cahal_bids.engine.networks import ResidualUNet3D
    from cahal_bids.engine.patch_statistics import PATCH_MEAN_DEFAULTS
    from cahal_bids.engine.zoo import write_zoo
    from cahal_bids.physics.degradation import degrade

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        from nilearn.datasets import load_mni152_template

        template = load_mni152_template(resolution=1)
        data = np.zeros((200, 200, 200), dtype=np.float32)
        source = np.asarray(template.get_fdata(dtype=np.float32))[:, 16:216, :]
        data[1:198, :, 5:194] = source
        _, low = degrade(torch.from_numpy(data), (1.0, 1.0, 4.0), return_low_resolution=True)
        image = work / 'input_T1w.nii.gz'
        save_image(low.numpy(), low_resolution_affine(np.eye(4), (1.0, 1.0, 4.0)), image)
        zoo = args.zoo
        if zoo is None:
            torch.manual_seed(0)
            network = ResidualUNet3D(levels=args.levels, initial_filters=args.filters)
            zoo = write_zoo(
                work / 'zoo',
                name='benchmark',
                version='0',
                modality='T1w',
                architecture={'name': 'ResidualUNet3D', 'config': network.config()},
                normalization=DEFAULT_NORMALIZATION,
                experts={'V4A1': network.state_dict()},
                norm_statistics=PATCH_MEAN_DEFAULTS,
            )
        enhance = [
            str(Path(sys.executable).parent / 'cahal-enhance'),
            str(image),
            str(work / 'out.nii.gz'),
            '--zoo',
            str(zoo),
            '--threads',
            str(args.threads),
            '--device',
            args.device,
            '--precision',
            args.precision,
            '--quiet',
        ]
        if args.consistency_projection is not None:
            enhance += ['--consistency-projection', args.consistency_projection]
        enhance_s, enhance_gib, _ = _run(enhance)
        sidecar = json.loads((work / 'out.json').read_text())
        synth = [sys.executable, '-c', SYNTHSR_SNIPPET, str(args.threads), args.device]
        _, _, stdout = _run(synth)
        forward_text, peak_kib = stdout.split()[-2:]
        forward_s = float(forward_text)
        peak_synth_gib = int(peak_kib) / 1024**2

    print(
        f'output grid {sidecar["output_shape"]}, expert cell {sidecar["cell"]}, '
        f'tile {sidecar["tile_size"]}, device {sidecar["device"]}, threads {args.threads}, '
        f'precision {sidecar["precision"]}, '
        f'projection {sidecar["consistency"]["projection"]}'
    )
    print()
    print('| run | seconds | peak RSS (GiB) |')
    print('| --- | ---: | ---: |')
    print(
        f'| cahal-enhance end to end (F={args.filters}, {args.levels} levels, '
        f'{sidecar["precision"]}) '
        f'| {enhance_s:.1f} | {enhance_gib:.2f} |'
    )
    print(f'| SynthSR-sized U-Net forward only | {forward_s:.1f} | {peak_synth_gib:.2f} |')
    print(f'| ratio cahal-enhance / SynthSR forward | {enhance_s / forward_s:.3f} | |')


if __name__ == '__main__':
    main()
