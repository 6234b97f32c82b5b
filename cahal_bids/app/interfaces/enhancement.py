"""Nipype interfaces for the per-image steps: denoise, then CAHAL routing and enhancement."""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from cahal_bids.core.nifti import nifti_stem
from cahal_bids.engine.consistency_guard import DEFAULT_PROJECTION, PROJECTIONS

# traits.Enum's default is its first value
PROJECTIONS_DEFAULT_FIRST = (DEFAULT_PROJECTION,) + tuple(
    mode for mode in PROJECTIONS if mode != DEFAULT_PROJECTION
)

__all__ = ['CahalEnhance', 'DenoiseImage']


def _output_name(in_file: str, suffix: str) -> str:
    return os.path.abspath(f'{nifti_stem(in_file)}_{suffix}.nii.gz')


class _DenoiseImageInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='image to denoise (any resolution)')
    seed = traits.Int(0, usedefault=True, desc='ANTs random seed')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='ITK threads')


class _DenoiseImageOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='denoised image, same grid, float32')


class DenoiseImage(SimpleInterface):
    """ANTs adaptive non-local means (Rician) inside an intensity-based head mask."""

    input_spec = _DenoiseImageInputSpec
    output_spec = _DenoiseImageOutputSpec

    def _run_interface(self, runtime):
        from cahal_bids.app.denoising import denoise_file

        os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(self.inputs.num_threads)
        out_file = _output_name(self.inputs.in_file, 'denoised')
        denoise_file(self.inputs.in_file, out_file, seed=self.inputs.seed)
        self._results['out_file'] = out_file
        return runtime


class _CahalEnhanceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='low-resolution image')
    # The zoo enters the cache key through its manifest, which lists every expert's
    # sha256: a file input, so Nipype hashes its content (or its size and time stamp,
    # with hash_method=timestamp), not its path. Replacing the weights in the same folder
    # rewrites the manifest and reruns the node; moving the zoo elsewhere does not.
    zoo = Directory(mandatory=True, nohash=True, desc='zoo folder (hashed through zoo_manifest)')
    zoo_manifest = File(
        mandatory=True, desc="the zoo's manifest.json (cache key: the zoo's content)"
    )
    zoo_id = traits.Str(desc='optional label of the zoo, e.g. its name and version (cache key)')
    device = traits.Enum('auto', 'cpu', 'cuda', usedefault=True, desc='torch device')
    precision = traits.Enum(
        'auto', 'fp32', 'bf16', usedefault=True, desc='expert arithmetic (auto: bf16 if native)'
    )
    consistency_projection = traits.Enum(
        *PROJECTIONS_DEFAULT_FIRST,
        usedefault=True,
        desc='what follows the expert: off, adaptive (as far as the noise allows) or exact '
        'projection onto the acquired data',
    )
    acquired_file = File(
        exists=True,
        desc='the raw acquisition in_file was denoised from (same grid): what a projection '
        'aims at (default: in_file)',
    )
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='torch CPU threads')
    contrast = traits.Str(
        desc="the image's contrast (BIDS suffix), i.e. its route; default: the zoo's modality"
    )


class _CahalEnhanceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='1 mm native-space image (input unchanged if skipped)')
    out_report = File(exists=True, desc='JSON: routing, expert, timing, versions')
    skipped = traits.Bool(desc='True when the input was already at 1 mm or finer')


class CahalEnhance(SimpleInterface):
    """Route an image by its header and run the one chosen expert (:class:`Enhancer`).

    The sidecar records the image's contrast (``route``) and the zoo that served it.
    """

    input_spec = _CahalEnhanceInputSpec
    output_spec = _CahalEnhanceOutputSpec

    def _run_interface(self, runtime):
        import torch

        from cahal_bids.engine.inference import Enhancer
        from cahal_bids.engine.zoo import MANIFEST_NAME

        zoo = Path(self.inputs.zoo)
        if Path(self.inputs.zoo_manifest).resolve() != (zoo / MANIFEST_NAME).resolve():
            raise ValueError(
                f'zoo_manifest {self.inputs.zoo_manifest} is not the manifest of the zoo {zoo}'
            )
        torch.set_num_threads(max(1, self.inputs.num_threads))
        enhancer = Enhancer(
            zoo,
            device=self.inputs.device,
            precision=self.inputs.precision,
            contrast=self.inputs.contrast if isdefined(self.inputs.contrast) else None,
            consistency_projection=self.inputs.consistency_projection,
        )
        acquired = self.inputs.acquired_file
        result = enhancer.enhance_file(
            self.inputs.in_file,
            _output_name(self.inputs.in_file, 'cahal'),
            acquired_path=acquired if isdefined(acquired) else None,
        )
        self._results['out_file'] = str(result.output_path)
        self._results['out_report'] = str(result.sidecar_path)
        self._results['skipped'] = bool(result.sidecar['skipped'])
        return runtime
