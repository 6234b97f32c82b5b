#!/usr/bin/env python
"""Recipe: embed ``init_enhance_wf`` inside a host Nipype workflow, as an fMRIPrep-style
pipeline would, and hand its 1 mm native-space output to the host's own next step.

The host here is deliberately small: a DataGrabber-like input node, the CAHAL
enhancement sub-workflow (denoising off or on), and a host node that measures
the enhanced image (what a segmentation step would consume). Usage::

    python examples/embed_enhance_wf.py IMAGE ZOO WORK_DIR [--denoise]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cahal_bids.app.workflows.enhance import init_enhance_wf


def describe(in_file: str) -> str:
    """A host step: report the grid the enhanced image is on."""
    import nibabel as nib

    image = nib.load(in_file)
    sizes = 'x'.join(f'{size:g}' for size in image.header.get_zooms()[:3])
    return f'{in_file}: shape {image.shape}, voxel sizes {sizes} mm'


def build_host_workflow(image: Path, zoo: Path, work_dir: Path, denoise: bool) -> pe.Workflow:
    host = pe.Workflow(name='host_wf', base_dir=str(work_dir))
    source = pe.Node(niu.IdentityInterface(fields=['t1w']), name='source')
    source.inputs.t1w = str(image.resolve())
    enhance_wf = init_enhance_wf(
        modality='T1w',
        denoise=denoise,
        device='cpu',
        zoo=str(zoo.resolve()),
        omp_nthreads=1,
        name='cahal_enhance_wf',
    )
    report = pe.Node(
        niu.Function(function=describe, input_names=['in_file'], output_names=['summary']),
        name='describe_enhanced',
    )
    host.connect([
        (source, enhance_wf, [('t1w', 'inputnode.in_file')]),
        (enhance_wf, report, [('outputnode.enhanced', 'in_file')]),
    ])  # fmt: skip
    return host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('image', type=Path)
    parser.add_argument('zoo', type=Path)
    parser.add_argument('work_dir', type=Path)
    parser.add_argument('--denoise', action='store_true')
    args = parser.parse_args()
    host = build_host_workflow(args.image, args.zoo, args.work_dir, args.denoise)
    graph = host.run(plugin='Linear')
    for node in graph.nodes():
        if node.name == 'describe_enhanced':
            print(node.result.outputs.summary)


if __name__ == '__main__':
    main()
