"""One run of the suite, from a composed config to results.json: the pipeline (obtain the model,
compress, fine-tune, evaluate, report), the compress stage, the dense-model cache, the command
line's overrides and the console. A top layer: nothing below imports it."""
