"""Linear registration of an enhanced image: to the template, or FLAIR to T1w."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from cahal_bids.app.boilerplate import package_version
from cahal_bids.app.interfaces.registration import RegisterLinear, ResampleToTemplate
from cahal_bids.app.interfaces.reports import RegistrationFigure

__all__ = ['init_register_wf']


def init_register_wf(
    *,
    template: str,
    omp_nthreads: int,
    sloppy: bool,
    template_file: str | None = None,
    affine: bool = True,
    resample: bool = False,
    seed: int = 0,
    moving_label: str = 'image',
    name: str = 'register_wf',
) -> Workflow:
    """ANTs rigid then affine registration of an enhanced image to a reference.

    The transform (forward and inverse, ITK text) is the result; the native-space
    image is resampled into the reference only when ``resample`` asks.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from cahal_bids.app.workflows.registration import init_register_wf
            wf = init_register_wf(template='MNI152NLin2009cAsym', template_file='tpl.nii.gz',
                                  omp_nthreads=1, sloppy=False)

    Parameters
    ----------
    template
        Space label of the reference (a TemplateFlow ID, or ``T1w`` for FLAIR to T1w).
    template_file
        The reference image; when None it comes through ``inputnode.reference``.
    affine
        Rigid then affine (True) or rigid only (False, e.g. FLAIR to T1w).
    resample
        Also resample the image into the reference (``--output-spaces``).
    moving_label
        What the moving images are, for the methods text (``workflow.__desc__``):
        ``'image'``, or e.g. ``'FLAIR image'``.

    Inputs
    ------
    moving
        The enhanced native-space image.
    reference
        The reference image (when ``template_file`` is None).

    Outputs
    -------
    forward, inverse
        ITK text transforms, image to reference and back.
    report
        JSON: stages, similarity, seconds.
    figure
        PNG of the registered image with the reference's edges.
    resampled
        The image on the reference grid (only with ``resample``).
    """
    workflow = Workflow(name=name)
    stages = 'rigid then affine' if affine else 'rigid'
    workflow.__desc__ = (
        f'A {stages} transform from each restored {moving_label} to {template} space was '
        'estimated with ANTs (Mattes mutual information, multi-resolution; ANTs through '
        f'antspyx {package_version("antspyx")}). '
        + (
            'The restored image was additionally resampled (linearly) into that space; '
            'the native-space image was kept.\n\n'
            if resample
            else 'The restored image itself was left in native space.\n\n'
        )
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=['moving', 'reference']), name='inputnode')
    if template_file is not None:
        inputnode.inputs.reference = template_file
    outputnode = pe.Node(
        niu.IdentityInterface(fields=['forward', 'inverse', 'report', 'figure', 'resampled']),
        name='outputnode',
    )
    register = pe.Node(
        RegisterLinear(affine=affine, sloppy=sloppy, seed=seed, num_threads=omp_nthreads),
        name='register',
        n_procs=omp_nthreads,
        mem_gb=1.5,
    )
    figure = pe.Node(RegistrationFigure(), name='figure', mem_gb=1.0)
    connections = [
        (inputnode, register, [('moving', 'moving'), ('reference', 'fixed')]),
        (inputnode, figure, [('moving', 'moving'), ('reference', 'template')]),
        (register, figure, [('forward', 'transform')]),
        (
            register,
            outputnode,
            [('forward', 'forward'), ('inverse', 'inverse'), ('out_report', 'report')],
        ),
        (figure, outputnode, [('out_file', 'figure')]),
    ]
    if resample:
        resampler = pe.Node(ResampleToTemplate(), name='resample', mem_gb=1.0)
        connections += [
            (inputnode, resampler, [('moving', 'in_file'), ('reference', 'template')]),
            (register, resampler, [('forward', 'transform')]),
            (resampler, outputnode, [('out_file', 'resampled')]),
        ]
    workflow.connect(connections)
    return workflow
