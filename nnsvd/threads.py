"""The old path of ``nnsvd.run.threads``: SweepThreads, the Hydra callback that conf/config.yaml named before the layout, so that a saved
config or code naming ``nnsvd.threads`` still works. The same module object; new code names ``nnsvd.run.threads``."""

import sys

from nnsvd.run import threads

sys.modules[__name__] = threads
