"""The notebook side of storch_nb: the ``%%storch`` magic (``magic``; its options,
declared once, in ``options``; the option line split in ``words``), how results
are shown (``display``, built on ``tables``) and the lab (``lab``; which
estimators fit which site in ``fitting``). The runs behind the pictures are in
:mod:`storch_nb.experiments`, the pictures in :mod:`storch_nb.figures`.

``%load_ext storch_nb`` calls :func:`storch_nb.notebook.magic.load_ipython_extension`.
"""

from .magic import StorchMagics, load_ipython_extension, unload_ipython_extension

__all__ = ["StorchMagics", "load_ipython_extension", "unload_ipython_extension"]
