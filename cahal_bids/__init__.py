"""CAHAL: native-space restoration of low-resolution brain MRI to 1 mm isotropic.

Importing the package is cheap: it does no I/O, imports no torch and sets no threads.
"""

from __future__ import annotations

__version__ = '0.1.0.dev0'

__all__ = ['__version__']
