"""Fluoro2DRR core: C-arm geometry, bones, DiffDRR rendering, translation, registration, formats.

No Qt and no slicer.app here; the Slicer module (Fluoro2DRR.py) and the CLI (cli.py) are thin faces.
"""
__version__ = "0.1.0"
