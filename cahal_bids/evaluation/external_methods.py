"""Any command-line super-resolution tool as a ``cahal-eval`` method.

A method is given as ``NAME=TEMPLATE``, where the template is a command line with the
placeholders ``{input}`` (the simulated low-resolution NIfTI) and ``{output}`` (where
the tool must write its estimate), for example::

    cahal-eval sub-01_T1w.nii.gz --out eval --method 'eclare=run-eclare --in-fpath {input}
        --out-fpath {output}'

The template is split like a shell line (:func:`shlex.split`) but run without a shell,
each placeholder replaced by one argument. The estimate may be on any grid: when it is
not the ground truth's 1 mm grid, it is resampled onto it by world coordinates (linear
interpolation, zero outside), so tools that write at another resolution or with another
field of view are compared fairly.
"""

from __future__ import annotations

import os
import shlex
import string
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from cahal_bids.core.errors import CahalError

__all__ = ['ExternalMethodError', 'command_method', 'parse_method_spec']

PLACEHOLDERS = frozenset({'input', 'output'})


class ExternalMethodError(CahalError):
    """A command-line method is malformed or failed."""


def parse_method_spec(spec: str) -> tuple[str, str]:
    """``NAME=TEMPLATE`` -> (name, template), checking the placeholders.

    >>> parse_method_spec('copy=cp {input} {output}')
    ('copy', 'cp {input} {output}')
    """
    name, separator, template = spec.partition('=')
    name = name.strip()
    if not separator or not name or not template.strip():
        raise ExternalMethodError(f'--method {spec!r}: expected NAME=COMMAND TEMPLATE')
    if not (name.replace('-', '').replace('_', '').isalnum()):
        raise ExternalMethodError(f'--method {spec!r}: the name may hold letters, digits, - and _')
    if name in {'trilinear', 'cubic', 'cahal'}:
        raise ExternalMethodError(f'--method {spec!r}: {name!r} is a built-in method')
    try:
        fields = {
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        }
    except ValueError as error:
        raise ExternalMethodError(f'--method {spec!r}: bad template ({error})') from None
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ExternalMethodError(
            f'--method {spec!r}: unknown placeholder(s) {sorted(unknown)}; use {{input}} and '
            '{output}'
        )
    missing = PLACEHOLDERS - fields
    if missing:
        raise ExternalMethodError(f'--method {spec!r}: the template needs {sorted(missing)}')
    return name, template


def _on_grid(
    data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:
    """``data`` (with ``affine``) sampled at the voxel centres of the target grid."""
    covers = all(have >= want for have, want in zip(data.shape[:3], shape, strict=True))
    if covers and np.allclose(affine, target_affine, atol=1e-4):
        return np.ascontiguousarray(data[: shape[0], : shape[1], : shape[2]], dtype=np.float32)
    from scipy.ndimage import map_coordinates

    to_source = np.linalg.inv(affine) @ target_affine
    indices = np.stack(
        np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing='ij'), axis=0
    ).reshape(3, -1)
    coordinates = to_source[:3, :3] @ indices + to_source[:3, 3:4]
    sampled = map_coordinates(data.astype(np.float32), coordinates, order=1, cval=0.0)
    return sampled.reshape(shape).astype(np.float32)


def command_method(name: str, template: str, *, timeout_s: float | None = None):
    """An evaluation method (``f(low, low_affine, resolution, shape) -> estimate``)
    that runs ``template`` on each simulated acquisition in a temporary folder."""
    from cahal_bids.core.grid import native_grid
    from cahal_bids.core.nifti import load_image, save_image

    def method(low, low_affine, resolution, shape):
        with tempfile.TemporaryDirectory(prefix=f'cahal-eval-{name}-') as folder:
            source = Path(folder) / 'input.nii.gz'
            target = Path(folder) / 'output.nii.gz'
            save_image(low, low_affine, source)
            argv = [
                part.format(input=str(source), output=str(target))
                for part in shlex.split(template)
            ]
            try:
                result = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                    env={**os.environ},
                    check=False,
                )
            except FileNotFoundError:
                raise ExternalMethodError(
                    f'method {name}: command {argv[0]!r} not found'
                ) from None
            except subprocess.TimeoutExpired:
                raise ExternalMethodError(
                    f'method {name}: no result after {timeout_s} s'
                ) from None
            if result.returncode != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ['']
                raise ExternalMethodError(
                    f'method {name}: exit code {result.returncode}: {tail[0]}'
                )
            if not target.exists():
                raise ExternalMethodError(f'method {name}: the command wrote no {{output}} file')
            image = load_image(target)
            data = image.data if image.data.ndim == 3 else image.data[..., 0]
            grid = native_grid(low.shape, low_affine)
            return _on_grid(data, image.affine, grid.affine, tuple(int(n) for n in shape))

    return method
