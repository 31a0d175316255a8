"""The old path of ``nnsvd.training.classification``, which docs/library.md used to name: the same module
object, so that library code written against it still imports. New code imports
``nnsvd.training.classification``."""

import sys

from nnsvd.training import classification

sys.modules[__name__] = classification
