"""Derivative sinks: the only nodes that write into the output folder."""

from __future__ import annotations

from collections.abc import Mapping

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from cahal_bids.app.bids import bids_uri
from cahal_bids.app.interfaces.bids import DerivativesDataSink

__all__ = ['init_ds_enhanced_wf', 'init_ds_registration_wf']

NATIVE_RESOLUTION = (
    '1 mm isotropic, on a grid that keeps the voxel axes (direction cosines) and the '
    'outer field-of-view corner of the source image (native space)'
)


def _sink(name: str, **inputs) -> pe.Node:
    # a sink is a cheap copy: always rerun it, so deleted outputs come back on a rerun
    return pe.Node(
        DerivativesDataSink(**inputs), name=name, run_without_submitting=True, overwrite=True
    )


def init_ds_enhanced_wf(
    *,
    output_dir: str,
    entities: Mapping[str, str],
    modality: str,
    relative_path: str,
    denoised: bool,
    write_intermediate: bool,
    name: str = 'ds_enhanced_wf',
) -> Workflow:
    """Write ``..._desc-cahal_<suffix>.nii.gz`` with its sidecar, and its report figure.

    Inputs
    ------
    enhanced, report, figure
        From :func:`~cahal_bids.app.workflows.enhance.init_enhance_wf`.
    denoised
        The denoised input (written only with ``write_intermediate``).
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=['enhanced', 'report', 'figure', 'denoised']),
        name='inputnode',
    )
    source = bids_uri(relative_path)
    common = {'base_directory': output_dir, 'entities': dict(entities), 'suffix': modality}
    ds_enhanced = _sink(
        'ds_enhanced',
        desc='cahal',
        metadata={
            'Sources': [source],
            'SpatialReference': source,
            'Resolution': NATIVE_RESOLUTION,
            'Denoised': denoised,
            'Description': 'CAHAL restoration of the source image (float32).',
        },
        **common,
    )
    ds_figure = _sink(
        'ds_figure',
        desc='cahal',
        extension='.png',
        datatype_folder='figures',
        write_sidecar=False,
        **common,
    )
    connections = [
        (inputnode, ds_enhanced, [('enhanced', 'in_file'), ('report', 'meta_file')]),
        (inputnode, ds_figure, [('figure', 'in_file')]),
    ]
    if write_intermediate and denoised:
        ds_denoised = _sink(
            'ds_denoised',
            desc='denoised',
            metadata={
                'Sources': [source],
                'SpatialReference': source,
                'Description': 'ANTs adaptive non-local means (Rician), source grid.',
            },
            **common,
        )
        connections.append((inputnode, ds_denoised, [('denoised', 'in_file')]))
    workflow.connect(connections)
    return workflow


def init_ds_registration_wf(
    *,
    output_dir: str,
    entities: Mapping[str, str],
    modality: str,
    relative_path: str,
    template: str,
    resampled: bool,
    brain_mask: bool = False,
    reference_path: str | None = None,
    name: str = 'ds_registration_wf',
) -> Workflow:
    """Write the transforms ``..._from-<suffix>_to-<template>_mode-image_xfm.txt`` and back.

    ``reference_path`` (relative to the dataset), for a transform to another image such as
    the T1w: that image, named in the sidecar's ``Sources`` and ``SpatialReference`` (it
    may belong to another session of the participant when this one has no T1w).

    With ``brain_mask``, also the template's brain mask on the enhanced image's native
    grid, ``..._space-<suffix>_desc-brain_mask.nii.gz`` (``space-<suffix>``: the native
    space of that contrast, as fMRIPrep's ``space-T1w``; it keeps masks of several
    contrasts of one session apart).

    Inputs
    ------
    forward, inverse, report, figure, resampled, brain_mask
        From :func:`~cahal_bids.app.workflows.registration.init_register_wf`.
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=['forward', 'inverse', 'report', 'figure', 'resampled', 'brain_mask']
        ),
        name='inputnode',
    )
    source = bids_uri(relative_path)
    base = {'base_directory': output_dir, 'entities': dict(entities)}
    ds_forward = _sink(
        'ds_forward',
        suffix='xfm',
        extension='.txt',
        extra_entities=[('from', modality), ('to', template), ('mode', 'image')],
        metadata={'Sources': [source], 'Type': 'ITK linear transform (text)'}
        if reference_path is None
        else {
            'Sources': [source, bids_uri(reference_path)],
            'SpatialReference': bids_uri(reference_path),
            'Type': 'ITK linear transform (text)',
        },
        meta_key='Registration',
        **base,
    )
    ds_inverse = _sink(
        'ds_inverse',
        suffix='xfm',
        extension='.txt',
        extra_entities=[('from', template), ('to', modality), ('mode', 'image')],
        write_sidecar=False,
        **base,
    )
    ds_figure = _sink(
        'ds_figure',
        suffix=modality,
        extension='.png',
        space=template,
        desc='registration',
        datatype_folder='figures',
        write_sidecar=False,
        **base,
    )
    connections = [
        (inputnode, ds_forward, [('forward', 'in_file'), ('report', 'meta_file')]),
        (inputnode, ds_inverse, [('inverse', 'in_file')]),
        (inputnode, ds_figure, [('figure', 'in_file')]),
    ]
    if resampled:
        ds_resampled = _sink(
            'ds_resampled',
            suffix=modality,
            space=template,
            desc='cahal',
            metadata={
                'Sources': [source],
                'SpatialReference': template,
                'Description': 'CAHAL output resampled (linear) into the template.',
            },
            write_sidecar=True,
            **base,
        )
        connections.append((inputnode, ds_resampled, [('resampled', 'in_file')]))
    if brain_mask:
        ds_mask = _sink(
            'ds_brain_mask',
            suffix='mask',
            space=modality,
            desc='brain',
            metadata={
                'Sources': [source],
                'SpatialReference': source,
                'Type': 'Brain',
                'Description': (
                    f'The {template} brain mask carried onto the native 1 mm grid of the '
                    'CAHAL output by the inverse of its template transform (linear, kept '
                    'at >= 1/2): the brain the registration was checked in.'
                ),
            },
            **base,
        )
        connections.append((inputnode, ds_mask, [('brain_mask', 'in_file')]))
    workflow.connect(connections)
    return workflow
