"""The whole run (:func:`init_cahal_wf`) and one participant (:func:`init_single_subject_wf`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from cahal_bids import __version__
from cahal_bids.app.bids import InputImage
from cahal_bids.app.boilerplate import package_version
from cahal_bids.app.config import RunConfig
from cahal_bids.app.workflows.enhance import init_enhance_wf
from cahal_bids.app.workflows.outputs import init_ds_enhanced_wf, init_ds_registration_wf
from cahal_bids.app.workflows.registration import init_compose_wf, init_register_wf
from cahal_bids.engine.consistency_guard import DEFAULT_PROJECTION

__all__ = ['init_cahal_wf', 'init_single_subject_wf', 'subject_log_dir']

REFERENCES = (
    '### References\n\n'
    '- Morell-Ortega et al., CAHAL: clinically applicable resolution enhancement for '
    'low-resolution MRI scans.\n'
    '- Avants et al., A reproducible evaluation of ANTs similarity metric performance in '
    'brain image registration, NeuroImage 2011.\n'
    '- Manjon et al., Adaptive non-local means denoising of MR images with spatially '
    'varying noise levels, JMRI 2010.\n'
    '- Gorgolewski et al., Nipype, Front. Neuroinform. 2011.\n'
    '- Yarkoni et al., PyBIDS, JOSS 2019.\n'
)
"""The methods text's references (``__postdesc__`` of :func:`init_cahal_wf`)."""


def subject_log_dir(output_dir: str | Path, subject: str, run_id: str) -> Path:
    """Where a participant's crash files and run configuration go (as in fMRIPrep)."""
    return Path(output_dir) / f'sub-{subject}' / 'log' / run_id


def _reference_t1w(image: InputImage, t1ws: Sequence[InputImage]) -> InputImage | None:
    """The T1w a FLAIR or T2w is aligned to: the first of its session, else the subject's first."""
    same_session = [t1w for t1w in t1ws if t1w.session == image.session]
    candidates = same_session or list(t1ws)
    return candidates[0] if candidates else None


def init_single_subject_wf(
    *,
    subject: str,
    images: Sequence[InputImage],
    output_dir: str,
    zoos: Mapping[str, str],
    zoo_ids: Mapping[str, str],
    denoise: bool,
    device: str,
    precision: str,
    template: str,
    template_file: str | None,
    skip_registration: bool,
    output_spaces: bool,
    write_intermediate: bool,
    sloppy: bool,
    omp_nthreads: int,
    seed: int,
    consistency_projection: str = DEFAULT_PROJECTION,
    template_brain: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Workflow:
    """Enhance, register and write every image of one participant.

    Each image is an independent branch: a failure in one does not stop the
    others. When the participant has a T1w image, every image of another contrast
    (FLAIR, T2w) also gets a rigid transform to a T1w (of the same session when there
    is one), written as ``from-<contrast>_to-T1w``, and its template transform is that
    rigid transform composed with the T1w's
    (:func:`~cahal_bids.app.workflows.registration.init_compose_wf`); images of a
    participant without a T1w, and the T1w images, are registered to the template
    directly. ``template_brain`` holds the brain-extracted template and its brain mask
    (``{'brain': ..., 'mask': ...}``).

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from pathlib import Path
            from cahal_bids.app.bids import InputImage
            from cahal_bids.app.workflows.base import init_single_subject_wf
            image = InputImage(path=Path('sub-01_T1w.nii.gz'), modality='T1w', subject='01',
                               entities={'subject': '01'},
                               relative_path='sub-01/anat/sub-01_T1w.nii.gz')
            wf = init_single_subject_wf(
                subject='01', images=[image], output_dir='out', zoos={'T1w': 'zoo'},
                zoo_ids={'T1w': 'zoo'}, denoise=True, device='cpu', precision='fp32',
                template='MNI152NLin2009cAsym', template_file='tpl.nii.gz',
                skip_registration=False, output_spaces=False, write_intermediate=False,
                sloppy=False, omp_nthreads=1, seed=0)
    """
    workflow = Workflow(name=name or f'sub_{subject}_wf')
    enhanced_nodes: dict[str, Workflow] = {}
    ds_registration_wfs: dict[str, Workflow] = {}
    for image in images:
        enhance_wf = init_enhance_wf(
            modality=image.modality,
            denoise=denoise,
            device=device,
            zoo=zoos[image.modality],
            zoo_id=zoo_ids[image.modality],
            precision=precision,
            consistency_projection=consistency_projection,
            omp_nthreads=omp_nthreads,
            seed=seed,
            name=f'enhance_{image.key}_wf',
        )
        enhance_wf.inputs.inputnode.in_file = str(image.path)
        ds_enhanced_wf = init_ds_enhanced_wf(
            output_dir=output_dir,
            entities=image.entities,
            modality=image.modality,
            relative_path=image.relative_path,
            denoised=denoise,
            write_intermediate=write_intermediate,
            name=f'ds_enhanced_{image.key}_wf',
        )
        workflow.connect([
            (enhance_wf, ds_enhanced_wf, [
                ('outputnode.enhanced', 'inputnode.enhanced'),
                ('outputnode.report', 'inputnode.report'),
                ('outputnode.figure', 'inputnode.figure'),
                ('outputnode.denoised', 'inputnode.denoised'),
            ]),
        ])  # fmt: skip
        enhanced_nodes[image.key] = enhance_wf
        if skip_registration:
            continue
        ds_registration_wfs[image.key] = init_ds_registration_wf(
            output_dir=output_dir,
            entities=image.entities,
            modality=image.modality,
            relative_path=image.relative_path,
            template=template,
            resampled=output_spaces,
            brain_mask=True,
            name=f'ds_registration_{image.key}_wf',
        )
    t1ws = [image for image in images if image.modality == 'T1w']
    references = {
        image.key: _reference_t1w(image, t1ws) for image in images if image.modality != 'T1w'
    }
    template_wfs: dict[str, Workflow] = {}
    for image in images:
        if skip_registration or references.get(image.key) is not None:
            continue
        register_wf = init_register_wf(
            template=template,
            template_file=template_file,
            template_brain=template_brain,
            modality=image.modality,
            source=str(image.path),
            omp_nthreads=omp_nthreads,
            sloppy=sloppy,
            resample=output_spaces,
            seed=seed,
            moving_label=f'{image.modality} image',
            name=f'register_{image.key}_wf',
        )
        workflow.connect(
            enhanced_nodes[image.key], 'outputnode.enhanced', register_wf, 'inputnode.moving'
        )
        template_wfs[image.key] = register_wf
    for image in images:
        reference = references.get(image.key)
        if reference is None:
            continue
        # e.g. flair2t1w_flair_wf, t2w2t1w_t2w_ses1_wf
        prefix = f'{image.modality.lower()}2t1w'
        rigid_wf = init_register_wf(
            template='T1w',
            omp_nthreads=omp_nthreads,
            sloppy=sloppy,
            to_template=False,
            affine=False,
            seed=seed,
            moving_label=f'{image.modality} image',
            name=f'{prefix}_{image.key}_wf',
        )
        ds_rigid_wf = init_ds_registration_wf(
            output_dir=output_dir,
            entities=image.entities,
            modality=image.modality,
            relative_path=image.relative_path,
            template='T1w',
            resampled=False,
            reference_path=reference.relative_path,
            name=f'ds_{prefix}_{image.key}_wf',
        )
        workflow.connect([
            (enhanced_nodes[image.key], rigid_wf, [('outputnode.enhanced', 'inputnode.moving')]),
            (enhanced_nodes[reference.key], rigid_wf, [
                ('outputnode.enhanced', 'inputnode.reference'),
            ]),
            (rigid_wf, ds_rigid_wf, [
                ('outputnode.forward', 'inputnode.forward'),
                ('outputnode.inverse', 'inputnode.inverse'),
                ('outputnode.report', 'inputnode.report'),
                ('outputnode.figure', 'inputnode.figure'),
            ]),
        ])  # fmt: skip
        if skip_registration:
            continue
        compose_wf = init_compose_wf(
            template=template,
            modality=image.modality,
            template_file=template_file,
            template_brain=template_brain,
            resample=output_spaces,
            name=f'compose_{image.key}_wf',
        )
        workflow.connect([
            (enhanced_nodes[image.key], compose_wf, [('outputnode.enhanced', 'inputnode.moving')]),
            (rigid_wf, compose_wf, [('outputnode.forward', 'inputnode.to_t1w')]),
            (template_wfs[reference.key], compose_wf, [
                ('outputnode.forward', 'inputnode.t1w_to_template'),
            ]),
        ])  # fmt: skip
        template_wfs[image.key] = compose_wf
    for key, template_wf in template_wfs.items():
        workflow.connect([
            (template_wf, ds_registration_wfs[key], [
                ('outputnode.forward', 'inputnode.forward'),
                ('outputnode.inverse', 'inputnode.inverse'),
                ('outputnode.report', 'inputnode.report'),
                ('outputnode.figure', 'inputnode.figure'),
                ('outputnode.resampled', 'inputnode.resampled'),
                ('outputnode.brain_mask', 'inputnode.brain_mask'),
            ]),
        ])  # fmt: skip
    return workflow


def _enumerate(names: Sequence[str]) -> str:
    """``'T1w'``, ``'T1w and FLAIR'``, ``'T1w, FLAIR and T2w'``."""
    return ' and '.join(names) if len(names) < 3 else f'{", ".join(names[:-1])} and {names[-1]}'


def _contrasts_paragraph(
    contrasts: Sequence[str], zoo_modalities: Mapping[str, str] | None
) -> str:
    """The methods text's sentence on the contrasts, and on routes served by another's zoo."""
    text = f'Each {_enumerate(contrasts)} image was processed on its own, as follows.'
    for contrast in contrasts:
        served_by = (zoo_modalities or {}).get(contrast, contrast)
        if served_by != contrast:
            text += (
                f' {contrast} images were restored by the zoo of experts trained for '
                f'{served_by} images, which cahal-bids uses for {contrast} images.'
            )
    return text + '\n\n'


def init_cahal_wf(
    config: RunConfig,
    images: Mapping[str, Sequence[InputImage]],
    *,
    zoo_ids: Mapping[str, str],
    template_file: str | None,
    zoo_modalities: Mapping[str, str] | None = None,
    template_brain: Mapping[str, str] | None = None,
) -> Workflow:
    """The whole participant-level run: one sub-workflow per participant.

    This is the only builder that reads the run configuration. Each participant's
    crash files go to ``<output_dir>/sub-<label>/log/<run_id>/``. Its ``__desc__`` opens
    the methods text (software, the contrasts of the images, and which zoo served a
    contrast that has none of its own: ``zoo_modalities`` maps a contrast to the
    modality of the zoo that served it) and its ``__postdesc__`` closes it with the
    references; the steps in between are described by the sub-workflows
    (:func:`cahal_bids.app.boilerplate.methods_text` collects them).
    """
    workflow = Workflow(name='cahal_bids_wf', base_dir=config.work_dir)
    present = {image.modality for found in images.values() for image in found}
    contrasts = [name for name in config.modalities if name in present] or config.modalities
    workflow.__desc__ = (
        f'Results included in this manuscript come from processing with cahal-bids '
        f'{__version__}, a BIDS-App built with Nipype {package_version("nipype")} '
        '(Gorgolewski et al., 2011) that read the dataset with PyBIDS '
        f'{package_version("pybids")} (Yarkoni et al., 2019). '
        + _contrasts_paragraph(contrasts, zoo_modalities)
    )
    workflow.__postdesc__ = REFERENCES
    for subject, subject_images in sorted(images.items()):
        single_subject_wf = init_single_subject_wf(
            subject=subject,
            images=subject_images,
            output_dir=config.output_dir,
            zoos=config.zoos,
            zoo_ids=zoo_ids,
            denoise=config.denoise,
            device=config.device,
            precision=config.precision,
            consistency_projection=config.consistency_projection,
            template=config.template,
            template_file=template_file,
            skip_registration=config.skip_registration,
            output_spaces=config.output_spaces,
            write_intermediate=config.write_intermediate,
            sloppy=config.sloppy,
            omp_nthreads=config.omp_nthreads,
            seed=config.random_seed,
            template_brain=template_brain,
        )
        log_dir = subject_log_dir(config.output_dir, subject, config.run_id)
        single_subject_wf.config['execution']['crashdump_dir'] = str(log_dir)
        for node in single_subject_wf._get_all_nodes():
            node.config = node.config or {}
            node.config.setdefault('execution', {})['crashdump_dir'] = str(log_dir)
        workflow.add_nodes([single_subject_wf])
    return workflow
