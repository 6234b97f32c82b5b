"""Re-export shims for import paths of version 0.1 (removed in the next release)."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def reexport(old: str, new: str, namespace: dict[str, object]) -> ModuleType:
    """Warn that ``old`` moved to ``new`` and copy ``new``'s public names into ``namespace``."""
    warnings.warn(
        f'{old} moved to {new}; import it from there ({old} will be removed in the next release)',
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)
    names = getattr(module, '__all__', [name for name in vars(module) if not name.startswith('_')])
    namespace.update({name: getattr(module, name) for name in names})
    namespace['__all__'] = list(names)
    return module
