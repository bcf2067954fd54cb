"""Methods, one file each, behind the interface in `base`.

Importing this package loads no torch: `catalog` knows every method's settings from its file; the training
code is imported from `sslab.methods.base` (`build_method`) when a trial is built.
"""

from sslab.methods.catalog import BUILTIN, method_info, methods

__all__ = ["BUILTIN", "method_info", "methods"]
