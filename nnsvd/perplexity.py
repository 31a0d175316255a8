"""The old path of ``nnsvd.training.perplexity``, which docs/library.md used to name: the same module
object, so that library code written against it still imports. New code imports
``nnsvd.training.perplexity``."""

import sys

from nnsvd.training import perplexity

sys.modules[__name__] = perplexity
