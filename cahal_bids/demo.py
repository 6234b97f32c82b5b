"""The embedded demo behind ``make demo``: ``python -m cahal_bids.demo OUTPUT_DIR``.

It needs no data beyond what the installed packages ship: nilearn's copy of the
MNI ICBM152 2009a symmetric 1 mm T1w template (labelled as what it is,
``MNI152NLin2009aSym``) is degraded with the project's own physics model to a
1 x 1 x 4 mm axial thick-slice image, which is then routed and, when a trained
T1w zoo ships with the package, enhanced back to 1 mm in its native space.
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


def make_demo_image(path: Path, resolution: Sequence[float] = DEMO_RESOLUTION) -> Path:
    """Write a thick-slice T1w made from nilearn's template with the physics model."""
    import torch
    from nilearn.datasets import load_mni152_template

    from cahal_bids.degradation import degrade
    from cahal_bids.grid import low_resolution_affine
    from cahal_bids.nifti import save_image

    template = load_mni152_template(resolution=1)
    data = np.asarray(template.get_fdata(dtype=np.float32))
    _, low = degrade(torch.from_numpy(data), resolution, return_low_resolution=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(low.numpy(), low_resolution_affine(template.affine, resolution), path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cahal_bids.demo', description=__doc__)
    parser.add_argument('output_dir', type=Path, nargs='?', default=Path('demo-output'))
    args = parser.parse_args(argv)

    from cahal_bids.cli.enhance import dry_run_report
    from cahal_bids.cli.enhance import main as enhance_main
    from cahal_bids.zoo import ZooError, default_zoo_path

    output_dir: Path = args.output_dir.resolve()
    source = make_demo_image(output_dir / 'input' / f'tpl-{TEMPLATE_LABEL}_acq-thick_T1w.nii.gz')
    report = dry_run_report(source)
    (output_dir / 'routing.json').write_text(json.dumps(report, indent=2) + '\n')
    print(f'demo input ({" x ".join(f"{r:g}" for r in DEMO_RESOLUTION)} mm): {source}')
    print(
        f'routing: V = {report["V"]:g} mm^3, A = {report["A"]:.3f} -> expert {report["cell"]}; '
        f'output grid {report["output_grid"]["shape"]}'
    )
    try:
        default_zoo_path('T1w')
    except ZooError as error:
        print(f'enhancement skipped: {error}')
        print(f'results: {output_dir / "routing.json"}')
        return 0
    enhanced = output_dir / 'enhanced' / f'tpl-{TEMPLATE_LABEL}_desc-cahal_T1w.nii.gz'
    status = enhance_main([str(source), str(enhanced), '--modality', 'T1w'])
    if status != 0:
        return status
    print(f'results: {output_dir} (routing.json, enhanced/)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
