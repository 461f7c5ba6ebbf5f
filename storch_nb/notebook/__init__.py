"""The notebook side of storch_nb: the ``%%storch`` magic and how results are shown.

``%load_ext storch_nb`` calls :func:`storch_nb.notebook.magic.load_ipython_extension`.
"""

from .magic import StorchMagics, load_ipython_extension, unload_ipython_extension

__all__ = ["StorchMagics", "load_ipython_extension", "unload_ipython_extension"]
