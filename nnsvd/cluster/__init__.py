"""Running under SLURM and Hydra's launchers: requeue on a signal, job states from squeue, and the
Hydra callbacks that write a sweep's summary. A top layer: nothing below imports it."""
