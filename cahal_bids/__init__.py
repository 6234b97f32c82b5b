"""CAHAL: native-space restoration of low-resolution brain MRI to 1 mm isotropic.

Importing the package is cheap: it does no I/O, imports no torch, nibabel or Nipype and
sets no threads. The Python API is re-exported lazily (PEP 562), so
``from cahal_bids import Enhancer`` imports the engine only when it is asked for::

    import nibabel as nib
    from cahal_bids import Enhancer

    result = Enhancer(zoo='T1w', device='auto').enhance(nib.load('sub-01_T1w.nii.gz'))
    result.image, result.provenance
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = '0.1.0.dev0'

_LAZY: dict[str, str] = {
    'Enhancer': 'cahal_bids.engine.inference',
    'EnhancedImage': 'cahal_bids.engine.inference',
    'EnhanceResult': 'cahal_bids.engine.inference',
    'resolve_device': 'cahal_bids.engine.inference',
    'sidecar_path_for': 'cahal_bids.engine.inference',
    'Zoo': 'cahal_bids.engine.zoo',
    'ZooError': 'cahal_bids.engine.zoo',
    'default_zoo_path': 'cahal_bids.engine.zoo',
    'CahalError': 'cahal_bids.core.errors',
    'InvalidImageError': 'cahal_bids.core.errors',
}
"""Public name -> the module that defines it, imported on first access."""

__all__ = [
    'CahalError',
    'EnhanceResult',
    'EnhancedImage',
    'Enhancer',
    'InvalidImageError',
    'Zoo',
    'ZooError',
    '__version__',
    'default_zoo_path',
    'resolve_device',
    'sidecar_path_for',
]

if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from cahal_bids.core.errors import CahalError, InvalidImageError
    from cahal_bids.engine.inference import (
        EnhancedImage,
        Enhancer,
        EnhanceResult,
        resolve_device,
        sidecar_path_for,
    )
    from cahal_bids.engine.zoo import Zoo, ZooError, default_zoo_path


def __getattr__(name: str) -> Any:
    """Import a public name of the API from its module on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
