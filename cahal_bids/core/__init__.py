"""Core: errors, atomic writes, NIfTI I/O, orientation, the native grid, resampling, routing,
intensity normalisation and hashing. Imports nothing else from the package."""
