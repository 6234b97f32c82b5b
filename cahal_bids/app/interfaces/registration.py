"""Nipype interfaces for ANTs linear registration and resampling into a template."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

__all__ = ['RegisterLinear', 'ResampleToTemplate']


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
        from cahal_bids.core.atomic import write_json_atomic
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
        report = os.path.abspath('registration.json')
        write_json_atomic(report, result.as_dict())
        self._results.update(
            forward=str(result.forward), inverse=str(result.inverse), out_report=report
        )
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
