"""The old path of ``nnsvd.cluster.callbacks``: the Hydra callbacks (SweepSummary, SlurmJobStates) that conf/config.yaml named before the layout, so that a saved
config or code naming ``nnsvd.callbacks`` still works. The same module object; new code names ``nnsvd.cluster.callbacks``."""

import sys

from nnsvd.cluster import callbacks

sys.modules[__name__] = callbacks
