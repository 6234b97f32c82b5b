"""Nipype interfaces for ANTs linear registration, composition through the T1w, the
registration's brain mask, and resampling into a template."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

__all__ = [
    'BrainMaskInImage',
    'ComposeToTemplate',
    'RegisterLinear',
    'RegisterToTemplate',
    'ResampleToTemplate',
]


def _set_registration_outputs(interface: SimpleInterface, result) -> None:
    """``forward``, ``inverse`` and ``out_report`` (the result as JSON) of a registration."""
    from cahal_bids.core.atomic import write_json_atomic

    report = os.path.abspath('registration.json')
    write_json_atomic(report, result.as_dict())
    interface._results.update(
        forward=str(result.forward), inverse=str(result.inverse), out_report=report
    )


class _RegisterLinearInputSpec(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True, desc='image to align (the enhanced image)')
    fixed = File(exists=True, mandatory=True, desc='reference (template or T1w)')
    affine = traits.Bool(True, usedefault=True, desc='rigid then affine (False: rigid only)')
    sloppy = traits.Bool(False, usedefault=True, desc="ANTs' fast presets (tests, previews)")
    seed = traits.Int(0, usedefault=True, desc='ANTs random seed')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='ITK threads')


class _RegisterLinearOutputSpec(TraitedSpec):
    forward = File(exists=True, desc='moving -> fixed, ITK text')
    inverse = File(exists=True, desc='fixed -> moving, ITK text')
    out_report = File(exists=True, desc='JSON: stages, similarity, seconds')


class RegisterLinear(SimpleInterface):
    """Rigid then affine ANTs registration.

    Wraps :func:`~cahal_bids.preprocessing.registration.register_linear`.
    """

    input_spec = _RegisterLinearInputSpec
    output_spec = _RegisterLinearOutputSpec

    def _run_interface(self, runtime):
        from cahal_bids.preprocessing.registration import register_linear

        os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(self.inputs.num_threads)
        result = register_linear(
            self.inputs.moving,
            self.inputs.fixed,
            forward_path=os.path.abspath('forward_xfm.txt'),
            inverse_path=os.path.abspath('inverse_xfm.txt'),
            affine=self.inputs.affine,
            sloppy=self.inputs.sloppy,
            seed=self.inputs.seed,
        )
        _set_registration_outputs(self, result)
        return runtime


class _ResampleToTemplateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='native-space image')
    template = File(exists=True, mandatory=True, desc='template image (output grid)')
    transform = File(exists=True, mandatory=True, desc='ITK transform, image -> template')


class _ResampleToTemplateOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='image resampled (linear) on the template grid')


class ResampleToTemplate(SimpleInterface):
    """Resample an image into the template with its saved linear transform."""

    input_spec = _ResampleToTemplateInputSpec
    output_spec = _ResampleToTemplateOutputSpec

    def _run_interface(self, runtime):
        from cahal_bids.core.nifti import save_image
        from cahal_bids.preprocessing.registration import apply_to_template

        data, affine = apply_to_template(
            self.inputs.in_file, self.inputs.template, self.inputs.transform
        )
        out_file = os.path.abspath('in_template.nii.gz')
        save_image(data, affine, out_file)
        self._results['out_file'] = out_file
        return runtime


class _TemplateInputSpec(BaseInterfaceInputSpec):
    template = File(exists=True, mandatory=True, desc='template head (T1w, 1 mm)')
    template_brain = File(exists=True, mandatory=True, desc='brain-extracted template')
    template_mask = File(exists=True, mandatory=True, desc="the template's brain mask")
    template_name = traits.Str('template', usedefault=True, desc='template label')
    modality = traits.Str(mandatory=True, desc='contrast of the moving image (T1w, FLAIR, T2w)')


def _template_brain(inputs):
    from pathlib import Path

    from cahal_bids.preprocessing.brain_template import TemplateBrain

    return TemplateBrain(
        name=inputs.template_name,
        head=Path(inputs.template),
        brain=Path(inputs.template_brain),
        brain_mask=Path(inputs.template_mask),
        record={},
    )


class _RegisterToTemplateInputSpec(_TemplateInputSpec):
    moving = File(exists=True, mandatory=True, desc='image to align (the enhanced image)')
    source = File(exists=True, desc='the acquired image, for the skull-stripped decision')
    sloppy = traits.Bool(False, usedefault=True, desc="ANTs' fast presets (tests, previews)")
    seed = traits.Int(0, usedefault=True, desc='ANTs random seed')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='ITK threads')


class RegisterToTemplate(SimpleInterface):
    """Initialisation, rigid then affine to the (brain-extracted) template, quality.

    Wraps :func:`~cahal_bids.preprocessing.registration.register_to_template`.
    """

    input_spec = _RegisterToTemplateInputSpec
    output_spec = _RegisterLinearOutputSpec

    def _run_interface(self, runtime):
        from cahal_bids.preprocessing.registration import register_to_template

        os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(self.inputs.num_threads)
        result = register_to_template(
            self.inputs.moving,
            _template_brain(self.inputs),
            forward_path=os.path.abspath('forward_xfm.txt'),
            inverse_path=os.path.abspath('inverse_xfm.txt'),
            modality=self.inputs.modality,
            detect_from=self.inputs.source or None,
            sloppy=self.inputs.sloppy,
            seed=self.inputs.seed,
        )
        _set_registration_outputs(self, result)
        return runtime


class _ComposeToTemplateInputSpec(_TemplateInputSpec):
    moving = File(exists=True, mandatory=True, desc='the image (e.g. an enhanced FLAIR)')
    to_intermediate = File(exists=True, mandatory=True, desc='image -> T1w, ITK text')
    intermediate_to_template = File(exists=True, mandatory=True, desc='T1w -> template')


class ComposeToTemplate(SimpleInterface):
    """The template transform through the session's T1w, and its quality.

    Wraps :func:`~cahal_bids.preprocessing.registration.compose_to_template`.
    """

    input_spec = _ComposeToTemplateInputSpec
    output_spec = _RegisterLinearOutputSpec

    def _run_interface(self, runtime):
        from cahal_bids.preprocessing.registration import compose_to_template

        result = compose_to_template(
            self.inputs.moving,
            self.inputs.to_intermediate,
            self.inputs.intermediate_to_template,
            _template_brain(self.inputs),
            forward_path=os.path.abspath('forward_xfm.txt'),
            inverse_path=os.path.abspath('inverse_xfm.txt'),
            modality=self.inputs.modality,
        )
        _set_registration_outputs(self, result)
        return runtime


class _BrainMaskInImageInputSpec(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True, desc='the registered (native-space) image')
    template_mask = File(exists=True, mandatory=True, desc="the template's brain mask")
    transform = File(exists=True, mandatory=True, desc='ITK transform, image -> template')


class _BrainMaskInImageOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='uint8 brain mask on the grid of the image')


class BrainMaskInImage(SimpleInterface):
    """The template's brain mask carried onto the image's native grid.

    Wraps :func:`~cahal_bids.preprocessing.registration_quality.brain_mask_in_image`.
    """

    input_spec = _BrainMaskInImageInputSpec
    output_spec = _BrainMaskInImageOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from cahal_bids.core.nifti import save_image
        from cahal_bids.preprocessing.registration_quality import brain_mask_in_image

        mask, affine = brain_mask_in_image(
            self.inputs.moving, self.inputs.template_mask, self.inputs.transform
        )
        out_file = os.path.abspath('brain_mask.nii.gz')
        save_image(mask, affine, out_file, dtype=np.uint8)
        self._results['out_file'] = out_file
        return runtime
