"""The derivatives sink: the only interface that writes into the output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

__all__ = ['WORK_PATH_KEYS', 'DerivativesDataSink']

WORK_PATH_KEYS = ('input', 'forward', 'inverse')
"""Keys of node reports that hold work-folder paths, left out of derivative sidecars."""


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = traits.Str(mandatory=True, desc='the derivatives folder')
    in_file = File(exists=True, mandatory=True, desc='file to write')
    entities = traits.Dict(mandatory=True, desc='source entities (subject, session, run, ...)')
    suffix = traits.Str(mandatory=True, desc='BIDS suffix (T1w, FLAIR, xfm, ...)')
    extension = traits.Str('.nii.gz', usedefault=True, desc='file extension')
    desc = traits.Str(desc='desc- entity')
    space = traits.Str(desc='space- entity')
    extra_entities = traits.List(
        traits.Tuple(traits.Str, traits.Str), desc='entities after space (from-, to-, mode-)'
    )
    datatype_folder = traits.Str('anat', usedefault=True, desc="'anat' or 'figures'")
    metadata = traits.Dict(desc='sidecar content')
    meta_file = File(exists=True, desc='JSON file merged into the sidecar under meta_key')
    meta_key = traits.Str('CAHAL', usedefault=True, desc='key for the content of meta_file')
    write_sidecar = traits.Bool(True, usedefault=True, desc='write a JSON sidecar')


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='the written derivative')
    out_meta = File(desc='its JSON sidecar')


class DerivativesDataSink(SimpleInterface):
    """Copy a result into ``base_directory`` under its BIDS-Derivatives name, atomically.

    The target is written next to its final name and moved into place, so a
    reader sees either the previous file or the complete new one.
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_interface(self, runtime):
        from cahal_bids.app.bids import derivative_folder, derivative_name
        from cahal_bids.core.atomic import atomic_path, write_json_atomic

        entities = {str(k): str(v) for k, v in self.inputs.entities.items()}
        name = derivative_name(
            entities,
            self.inputs.suffix,
            extension=self.inputs.extension,
            space=self.inputs.space or None,
            desc=self.inputs.desc or None,
            extra=list(self.inputs.extra_entities or []),
        )
        folder = Path(self.inputs.base_directory) / derivative_folder(entities)
        if self.inputs.datatype_folder != 'anat':
            # figures live beside the sessions, as in fMRIPrep: sub-<label>/figures/
            base = Path(self.inputs.base_directory) / f'sub-{entities["subject"]}'
            folder = base / self.inputs.datatype_folder
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        with atomic_path(target) as temporary:
            shutil.copyfile(self.inputs.in_file, temporary)
        self._results['out_file'] = str(target)
        if self.inputs.write_sidecar:
            sidecar = dict(self.inputs.metadata or {})
            if self.inputs.meta_file:
                content = json.loads(Path(self.inputs.meta_file).read_text())
                # paths into the work folder mean nothing once the run is over
                for key in WORK_PATH_KEYS:
                    content.pop(key, None)
                sidecar[self.inputs.meta_key] = content
            meta = target.with_name(name[: -len(self.inputs.extension)] + '.json')
            write_json_atomic(meta, sidecar)
            self._results['out_meta'] = str(meta)
        return runtime
