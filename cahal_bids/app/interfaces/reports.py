"""Nipype interfaces that draw the report figures (:mod:`cahal_bids.app.reports`)."""

from __future__ import annotations

import os

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec

__all__ = ['ComparisonFigure', 'RegistrationFigure']


class _ComparisonFigureInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='the original low-resolution input')
    enhanced = File(exists=True, mandatory=True, desc='the CAHAL output')


class _FigureOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='PNG figure')


class ComparisonFigure(SimpleInterface):
    """Input (trilinear, 1 mm), CAHAL output and their difference in three planes."""

    input_spec = _ComparisonFigureInputSpec
    output_spec = _FigureOutputSpec

    def _run_interface(self, runtime):
        from cahal_bids.app.reports import comparison_figure

        out_file = os.path.abspath('comparison.png')
        comparison_figure(self.inputs.in_file, self.inputs.enhanced, out_file)
        self._results['out_file'] = out_file
        return runtime


class _RegistrationFigureInputSpec(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True, desc='the registered (native-space) image')
    template = File(exists=True, mandatory=True, desc='the reference image')
    transform = File(exists=True, mandatory=True, desc='ITK transform, image -> reference')


class RegistrationFigure(SimpleInterface):
    """The image resampled into the reference with the reference's edges over it."""

    input_spec = _RegistrationFigureInputSpec
    output_spec = _FigureOutputSpec

    def _run_interface(self, runtime):
        from cahal_bids.app.reports import registration_figure

        out_file = os.path.abspath('registration.png')
        registration_figure(
            self.inputs.moving, self.inputs.template, self.inputs.transform, out_file
        )
        self._results['out_file'] = out_file
        return runtime
