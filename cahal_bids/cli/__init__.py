"""Command-line interfaces.

Heavy libraries are imported inside each ``main`` so ``--help`` answers at once.
"""
