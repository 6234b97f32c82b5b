"""Linear registration of an enhanced image: to the template (directly, or through the
session's T1w), or rigidly to a T1w."""

from __future__ import annotations

from collections.abc import Mapping

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from cahal_bids.app.boilerplate import package_version
from cahal_bids.app.interfaces.registration import (
    BrainMaskInImage,
    ComposeToTemplate,
    RegisterLinear,
    RegisterToTemplate,
    ResampleToTemplate,
)
from cahal_bids.app.interfaces.reports import RegistrationFigure

__all__ = ['init_compose_wf', 'init_register_wf']

_OUTPUTS = ['forward', 'inverse', 'report', 'figure', 'resampled', 'brain_mask']

_TEMPLATE_INPUTS = ['reference', 'reference_brain', 'reference_mask']

_QUALITY_TEXT = (
    'The registration was checked by the normalised mutual information between the '
    "registered image and the template inside the template's brain mask (flagged as "
    'doubtful below a threshold calibrated on validation images), and the template '
    "brain mask was carried back onto the restored image's grid. "
)


def _template_inputs(
    inputnode: pe.Node, template_file: str | None, template_brain: Mapping[str, str] | None
) -> None:
    if template_file is not None:
        inputnode.inputs.reference = template_file
    if template_brain is not None:
        inputnode.inputs.reference_brain = template_brain['brain']
        inputnode.inputs.reference_mask = template_brain['mask']


def _finish(
    workflow: Workflow,
    connections: list,
    *,
    transform_node: pe.Node,
    inputnode: pe.Node,
    outputnode: pe.Node,
    resample: bool,
    brain_mask: bool,
) -> None:
    """The figure, optional mask and resampling of a transform node; connect everything."""
    figure = pe.Node(RegistrationFigure(), name='figure', mem_gb=1.0)
    connections += [
        (inputnode, figure, [('moving', 'moving'), ('reference', 'template')]),
        (transform_node, figure, [('forward', 'transform')]),
        (
            transform_node,
            outputnode,
            [('forward', 'forward'), ('inverse', 'inverse'), ('out_report', 'report')],
        ),
        (figure, outputnode, [('out_file', 'figure')]),
    ]
    if brain_mask:
        mask = pe.Node(BrainMaskInImage(), name='brain_mask', mem_gb=1.0)
        connections += [
            (inputnode, mask, [('moving', 'moving'), ('reference_mask', 'template_mask')]),
            (transform_node, mask, [('forward', 'transform')]),
            (mask, outputnode, [('out_file', 'brain_mask')]),
        ]
    if resample:
        resampler = pe.Node(ResampleToTemplate(), name='resample', mem_gb=1.0)
        connections += [
            (inputnode, resampler, [('moving', 'in_file'), ('reference', 'template')]),
            (transform_node, resampler, [('forward', 'transform')]),
            (resampler, outputnode, [('out_file', 'resampled')]),
        ]
    workflow.connect(connections)


def _resample_text(resample: bool) -> str:
    if resample:
        return (
            'The restored image was additionally resampled (linearly) into that space; '
            'the native-space image was kept.\n\n'
        )
    return 'The restored image itself was left in native space.\n\n'


def init_register_wf(
    *,
    template: str,
    omp_nthreads: int,
    sloppy: bool,
    template_file: str | None = None,
    template_brain: Mapping[str, str] | None = None,
    modality: str = 'T1w',
    source: str | None = None,
    to_template: bool = True,
    affine: bool = True,
    resample: bool = False,
    seed: int = 0,
    moving_label: str = 'image',
    name: str = 'register_wf',
) -> Workflow:
    """ANTs registration of an enhanced image: to the template, or rigidly to a T1w.

    To a template (``to_template``), the transform comes from
    :func:`~cahal_bids.preprocessing.registration.register_to_template`: skull-stripped
    images (decided on ``source``, the acquired image) go to the brain-extracted template
    with its brain mask, from a multi-start initialisation, rigid then affine; its
    quality is measured inside the template's brain, and the template's brain mask is
    carried back onto the image (``brain_mask``). Otherwise (a FLAIR or T2w to its
    T1w) it is a plain rigid (``affine=False``) ANTs registration to
    ``inputnode.reference``. The native-space image is resampled into the reference
    only when ``resample`` asks.

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
    template_brain
        ``{'brain': ..., 'mask': ...}``: the brain-extracted template and its brain mask
        (:func:`~cahal_bids.app.registration.template_brain`); when None they come
        through ``inputnode.reference_brain`` and ``inputnode.reference_mask``.
    modality
        Contrast of the moving image (the quality threshold depends on it).
    source
        The acquired image, on which skull-stripping is detected.
    to_template
        Register to a template (True) or rigidly to a T1w (False).
    affine
        With ``to_template=False``: rigid then affine (True) or rigid only (False).
    resample
        Also resample the image into the reference (``--output-spaces``).
    moving_label
        What the moving images are, for the methods text (``workflow.__desc__``):
        ``'image'``, or e.g. ``'FLAIR image'``.

    Inputs
    ------
    moving
        The enhanced native-space image.
    acquired
        The acquired image (when ``source`` is None; to a template only).
    reference, reference_brain, reference_mask
        The reference image (when ``template_file`` is None) and, to a template, its
        brain-extracted copy and brain mask.

    Outputs
    -------
    forward, inverse
        ITK text transforms, image to reference and back.
    report
        JSON: stages, initialisation, similarity and quality, seconds.
    figure
        PNG of the registered image with the reference's edges.
    resampled
        The image on the reference grid (only with ``resample``).
    brain_mask
        The template's brain mask on the image's grid (to a template only).
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=['moving', 'acquired', *_TEMPLATE_INPUTS]), name='inputnode'
    )
    _template_inputs(inputnode, template_file, template_brain)
    if source is not None:
        inputnode.inputs.acquired = source
    outputnode = pe.Node(niu.IdentityInterface(fields=_OUTPUTS), name='outputnode')
    if to_template:
        workflow.__desc__ = (
            f'A rigid then affine transform from each restored {moving_label} to {template} '
            'space was estimated with ANTs (Mattes mutual information, multi-resolution; '
            f'ANTs through antspyx {package_version("antspyx")}), started from the best of '
            'several coarse rigid alignments of the two foregrounds; images found to be '
            'skull-stripped were registered to the brain-extracted template within its '
            'brain mask. ' + _QUALITY_TEXT + _resample_text(resample)
        )
        register = pe.Node(
            RegisterToTemplate(
                modality=modality,
                template_name=template,
                sloppy=sloppy,
                seed=seed,
                num_threads=omp_nthreads,
            ),
            name='register',
            n_procs=omp_nthreads,
            mem_gb=2.0,
        )
        connections = [
            (inputnode, register, [
                ('moving', 'moving'),
                ('acquired', 'source'),
                ('reference', 'template'),
                ('reference_brain', 'template_brain'),
                ('reference_mask', 'template_mask'),
            ]),
        ]  # fmt: skip
    else:
        stages = 'rigid then affine' if affine else 'rigid'
        workflow.__desc__ = (
            f'A {stages} transform from each restored {moving_label} to {template} space was '
            'estimated with ANTs (Mattes mutual information, multi-resolution; ANTs through '
            f'antspyx {package_version("antspyx")}). ' + _resample_text(resample)
        )
        register = pe.Node(
            RegisterLinear(affine=affine, sloppy=sloppy, seed=seed, num_threads=omp_nthreads),
            name='register',
            n_procs=omp_nthreads,
            mem_gb=1.5,
        )
        connections = [(inputnode, register, [('moving', 'moving'), ('reference', 'fixed')])]
    _finish(
        workflow,
        connections,
        transform_node=register,
        inputnode=inputnode,
        outputnode=outputnode,
        resample=resample,
        brain_mask=to_template,
    )
    return workflow


def init_compose_wf(
    *,
    template: str,
    modality: str,
    template_file: str | None = None,
    template_brain: Mapping[str, str] | None = None,
    resample: bool = False,
    name: str = 'compose_wf',
) -> Workflow:
    """The template transform of a FLAIR or T2w through its T1w, as fMRIPrep does for BOLD.

    The image's rigid transform to a T1w of the same subject and that T1w's transform to
    the template are composed
    (:func:`~cahal_bids.preprocessing.registration.compose_to_template`), so a thick
    FLAIR never has to match the T1w template on its own; the result is checked and
    drawn like a direct registration, and the template's brain mask is carried back onto
    the image.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from cahal_bids.app.workflows.registration import init_compose_wf
            wf = init_compose_wf(template='MNI152NLin2009cAsym', modality='FLAIR',
                                 template_file='tpl.nii.gz')

    Inputs
    ------
    moving
        The enhanced native-space image (FLAIR or T2w).
    to_t1w
        Its rigid transform to the T1w (ITK text, forward).
    t1w_to_template
        The T1w's transform to the template (ITK text, forward).
    reference, reference_brain, reference_mask
        The template, its brain-extracted copy and brain mask (unless given as arguments).

    Outputs
    -------
    forward, inverse, report, figure, resampled, brain_mask
        As :func:`init_register_wf`.
    """
    workflow = Workflow(name=name)
    workflow.__desc__ = (
        f'The transform of each restored {modality} image to {template} space was the '
        "composition of its rigid transform to the T1w image and of that T1w image's "
        'transform to the template (as fMRIPrep does for functional runs). '
        + _QUALITY_TEXT
        + _resample_text(resample)
    )
    inputnode = pe.Node(
        niu.IdentityInterface(fields=['moving', 'to_t1w', 't1w_to_template', *_TEMPLATE_INPUTS]),
        name='inputnode',
    )
    _template_inputs(inputnode, template_file, template_brain)
    outputnode = pe.Node(niu.IdentityInterface(fields=_OUTPUTS), name='outputnode')
    compose = pe.Node(
        ComposeToTemplate(modality=modality, template_name=template), name='compose', mem_gb=1.0
    )
    connections = [
        (inputnode, compose, [
            ('moving', 'moving'),
            ('to_t1w', 'to_intermediate'),
            ('t1w_to_template', 'intermediate_to_template'),
            ('reference', 'template'),
            ('reference_brain', 'template_brain'),
            ('reference_mask', 'template_mask'),
        ]),
    ]  # fmt: skip
    _finish(
        workflow,
        connections,
        transform_node=compose,
        inputnode=inputnode,
        outputnode=outputnode,
        resample=resample,
        brain_mask=True,
    )
    return workflow
