"""Per-image enhancement: denoise, then CAHAL routing and its one expert."""

from __future__ import annotations

import os

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from cahal_bids import __version__
from cahal_bids.app.boilerplate import package_version
from cahal_bids.app.interfaces.enhancement import CahalEnhance, DenoiseImage
from cahal_bids.app.interfaces.reports import ComparisonFigure
from cahal_bids.engine.consistency_guard import DEFAULT_PROJECTION
from cahal_bids.engine.zoo import MANIFEST_NAME

__all__ = ['init_enhance_wf']

ENHANCE_MEM_GB = 3.0
"""Peak memory of one enhancement (measured ~1.8 GiB for a 200^3 grid, fp32, 8 filters)."""


def init_enhance_wf(
    *,
    modality: str,
    denoise: bool,
    device: str,
    zoo: str,
    omp_nthreads: int,
    zoo_id: str = '',
    precision: str = 'auto',
    consistency_projection: str = DEFAULT_PROJECTION,
    seed: int = 0,
    name: str = 'enhance_wf',
) -> Workflow:
    """Denoise (optional) and restore one image to 1 mm in its native space.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from cahal_bids.app.workflows.enhance import init_enhance_wf
            wf = init_enhance_wf(modality='T1w', denoise=True, device='cpu',
                                 zoo='zoo', omp_nthreads=1)

    Parameters
    ----------
    modality
        The image's contrast, i.e. its route: ``'T1w'``, ``'FLAIR'`` or ``'T2w'``. The zoo
        decides the experts and must serve this route (a T1w zoo serves T2w images); the
        sidecar records both. The methods text names the contrasts once, at the top of
        the run.
    denoise
        Run ANTs adaptive non-local means before enhancement (and say so in the
        methods text, ``workflow.__desc__``).
    device
        ``'auto'``, ``'cpu'`` or ``'cuda'``.
    zoo
        Folder of the expert zoo that serves this route (absolute: nodes run in their own
        folders). The enhancement node's cache key is the content of the zoo's
        ``manifest.json`` (which lists every expert's sha256), not the folder's path, so
        replacing the weights in place reruns it.
    omp_nthreads
        Threads for ANTs and torch inside each node.
    zoo_id
        An optional label of the zoo (``cahal-bids`` passes its name, version and manifest
        hash), added to the cache key.
    consistency_projection
        What follows the expert: ``'off'``, ``'adaptive'`` or ``'exact'`` projection onto
        the acquired data (:class:`~cahal_bids.engine.inference.Enhancer`'s
        ``consistency_projection``).

    Inputs
    ------
    in_file
        The low-resolution image (any orientation).

    Outputs
    -------
    enhanced
        The 1 mm native-space image (the denoised input unchanged if already <= 1 mm).
    denoised
        The enhancement's input (the denoised image, or the input itself).
    report
        JSON sidecar of the enhancement (routing, expert, zoo, timing, versions).
    skipped
        True when the image was already at 1 mm or finer.
    figure
        PNG: trilinear input, CAHAL output and their difference in three planes.
    """
    workflow = Workflow(name=name)
    # one text for every modality, so that the run's methods name each step once
    workflow.__desc__ = (
        (
            'Each image was first denoised with the adaptive non-local means filter of ANTs '
            f'(Rician noise model; ANTs through antspyx {package_version("antspyx")}).\n\n'
            if denoise
            else ''
        )
        + 'Images with any voxel dimension above 1 mm were restored to 1 mm isotropic '
        'resolution in their native space with CAHAL (Morell-Ortega et al., as implemented '
        f'in cahal-bids {__version__}): each image was resampled trilinearly onto a 1 mm grid '
        'that keeps its own voxel axes and field of view, and a residual 3D U-Net added the '
        'missing high-frequency content. The network was one of 18 experts of a '
        'deterministic mixture, chosen from the image header alone by voxel volume (7 bins) '
        'and anisotropy (3 bins). Images already at 1 mm or finer were kept as they were. '
        f'PyTorch {package_version("torch")} ran the experts. '
        + {
            'exact': 'Each restored image was then projected onto its acquired data: the '
            'nearest image, in the least-squares sense, that gives back the input when '
            'acquired again with the box point-spread function of its voxels. ',
            'adaptive': 'Each restored image was then moved towards consistency with its '
            'acquired data (before denoising; acquired again with the box point-spread '
            'function of its voxels) only as far as the noise estimated in those data '
            'allowed: a Wiener filter, local and then per singular band of the acquisition '
            'operator, of the difference between the acquired data and the restored image '
            'acquired again. ',
        }.get(consistency_projection, '')
        + 'The consistency of each restored image with its acquired data was checked '
        'without ground truth: the image was acquired again with the box point-spread '
        'function of the input voxels and compared with the input (root mean squared '
        'difference inside the head), next to the same measure for trilinear interpolation, '
        'and images less consistent than trilinear interpolation were flagged.\n\n'
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=['in_file']), name='inputnode')
    outputnode = pe.Node(
        niu.IdentityInterface(fields=['enhanced', 'denoised', 'report', 'skipped', 'figure']),
        name='outputnode',
    )
    enhance = pe.Node(
        CahalEnhance(
            zoo=zoo,
            zoo_manifest=os.path.join(zoo, MANIFEST_NAME),
            **({'zoo_id': zoo_id} if zoo_id else {}),
            device=device,
            precision=precision,
            consistency_projection=consistency_projection,
            num_threads=omp_nthreads,
            contrast=modality,
        ),
        name='enhance',
        n_procs=omp_nthreads,
        mem_gb=ENHANCE_MEM_GB,
    )
    figure = pe.Node(ComparisonFigure(), name='figure', mem_gb=1.0)
    connections = [
        (
            enhance,
            outputnode,
            [('out_file', 'enhanced'), ('out_report', 'report'), ('skipped', 'skipped')],
        ),
        (enhance, figure, [('out_file', 'enhanced')]),
        (figure, outputnode, [('out_file', 'figure')]),
    ]
    if denoise:
        denoiser = pe.Node(
            DenoiseImage(seed=seed, num_threads=omp_nthreads),
            name='denoise',
            n_procs=omp_nthreads,
            mem_gb=1.5,
        )
        connections += [
            (inputnode, denoiser, [('in_file', 'in_file')]),
            (denoiser, enhance, [('out_file', 'in_file')]),
            (denoiser, figure, [('out_file', 'in_file')]),
            (denoiser, outputnode, [('out_file', 'denoised')]),
        ]
        if consistency_projection != 'off':
            # the projection aims at what was acquired, whose noise it can estimate
            connections.append((inputnode, enhance, [('in_file', 'acquired_file')]))
    else:
        connections += [
            (inputnode, enhance, [('in_file', 'in_file')]),
            (inputnode, figure, [('in_file', 'in_file')]),
            (inputnode, outputnode, [('in_file', 'denoised')]),
        ]
    workflow.connect(connections)
    return workflow
