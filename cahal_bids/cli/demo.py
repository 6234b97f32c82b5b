"""The embedded demo behind ``make demo``: ``python -m cahal_bids.cli.demo OUTPUT_DIR``.

It needs no data beyond what the installed packages ship: nilearn's copy of the
MNI ICBM152 2009a symmetric 1 mm T1w template (labelled as what it is,
``MNI152NLin2009aSym``) is degraded with the project's own physics model to a
1 x 1 x 4 mm axial thick-slice image, tilted and shifted in world space as a real
head in a scanner would be, and written as a one-participant BIDS dataset. The
BIDS-App then runs on it end to end (denoise, CAHAL, ANTs registration back to the
template, derivatives, reports) with the shipped T1w zoo, and the group level
summarises it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEMO_RESOLUTION = (1.0, 1.0, 4.0)
TEMPLATE_LABEL = 'MNI152NLin2009aSym'
DEMO_TILT_DEGREES = 8.0
DEMO_SHIFT_MM = (4.0, -6.0, 10.0)


def _tilt(degrees: float, shift: Sequence[float]) -> np.ndarray:
    """A rigid world transform: rotation about the left-right axis, then a shift."""
    angle = np.deg2rad(degrees)
    matrix = np.eye(4)
    matrix[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:3, 3] = shift
    return matrix


def make_demo_image(path: Path, resolution: Sequence[float] = DEMO_RESOLUTION) -> Path:
    """Write a thick-slice T1w made from nilearn's template with the physics model."""
    import torch
    from nilearn.datasets import load_mni152_template

    from cahal_bids.core.grid import low_resolution_affine
    from cahal_bids.core.nifti import save_image
    from cahal_bids.physics.degradation import degrade

    template = load_mni152_template(resolution=1)
    data = np.asarray(template.get_fdata(dtype=np.float32))
    _, low = degrade(torch.from_numpy(data), resolution, return_low_resolution=True)
    affine = _tilt(DEMO_TILT_DEGREES, DEMO_SHIFT_MM) @ low_resolution_affine(
        template.affine, resolution
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(low.numpy(), affine, path)
    return path


def make_demo_dataset(root: Path) -> Path:
    """A one-participant BIDS dataset holding the demo image; returns its root."""
    from cahal_bids.core.atomic import write_json_atomic

    write_json_atomic(
        root / 'dataset_description.json',
        {
            'Name': 'cahal-bids demo (MNI ICBM152 2009a, degraded to 1 x 1 x 4 mm)',
            'BIDSVersion': '1.9.0',
            'License': 'see the MNI ICBM152 2009 template license (shipped with nilearn)',
        },
    )
    image = make_demo_image(root / 'sub-demo' / 'anat' / 'sub-demo_acq-thick_T1w.nii.gz')
    write_json_atomic(image.with_name('sub-demo_acq-thick_T1w.json'), {})
    return root


def make_demo_template(path: Path) -> Path:
    """nilearn's MNI152NLin2009aSym 1 mm T1w, the registration target of the demo."""
    from nilearn.datasets import load_mni152_template

    from cahal_bids.core.nifti import save_image

    template = load_mni152_template(resolution=1)
    return save_image(template.get_fdata(dtype=np.float32), template.affine, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cahal_bids.cli.demo', description=__doc__)
    parser.add_argument('output_dir', type=Path, nargs='?', default=Path('demo-output'))
    parser.add_argument('--nprocs', type=int, default=2)
    parser.add_argument('--zoo', type=Path, default=None, help='T1w zoo (default: shipped)')
    args = parser.parse_args(argv)

    from cahal_bids.cli.enhance import dry_run_report
    from cahal_bids.cli.run import main as bids_app
    from cahal_bids.engine.zoo import ZooError, default_zoo_path

    output_dir: Path = args.output_dir.resolve()
    bids_dir = make_demo_dataset(output_dir / 'bids')
    source = next((bids_dir / 'sub-demo' / 'anat').glob('*_T1w.nii.gz'))
    template = make_demo_template(output_dir / f'tpl-{TEMPLATE_LABEL}_res-01_T1w.nii.gz')
    report = dry_run_report(source)
    (output_dir / 'routing.json').write_text(json.dumps(report, indent=2) + '\n')
    print(f'demo input ({" x ".join(f"{r:g}" for r in DEMO_RESOLUTION)} mm): {source}')
    print(
        f'routing: V = {report["V"]:g} mm^3, A = {report["A"]:.3f} -> expert {report["cell"]}; '
        f'output grid {report["output_grid"]["shape"]}'
    )
    try:
        zoo = args.zoo.resolve() if args.zoo else default_zoo_path('T1w')
    except ZooError as error:
        print(f'demo stopped: {error}', file=sys.stderr)
        return 2
    derivatives = output_dir / 'derivatives' / 'cahal-bids'
    common = [str(bids_dir), str(derivatives)]
    status = bids_app(
        [
            *common,
            'participant',
            '--work-dir',
            str(output_dir / 'work'),
            '--modalities',
            'T1w',
            '--template-file',
            str(template),
            '--template-name',
            TEMPLATE_LABEL,
            '--nprocs',
            str(args.nprocs),
            '--zoo',
            str(zoo),
        ]
    )
    if status != 0:
        return status
    status = bids_app([*common, 'group'])
    if status != 0:
        return status
    print(f'demo report: {derivatives / "sub-demo.html"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
