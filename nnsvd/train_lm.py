"""The old path of ``nnsvd.training.language_modeling``, which docs/library.md used to name: the same module
object, so that library code written against it still imports. New code imports
``nnsvd.training.language_modeling``."""

import sys

from nnsvd.training import language_modeling

sys.modules[__name__] = language_modeling
