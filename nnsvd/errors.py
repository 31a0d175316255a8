"""User-facing errors: each says, in one line, what is wrong and what to change.

Part of the base (docs/library.md, "The layers"): every layer raises these, so the module
stays at the top of the package and imports nothing."""


class NNSVDError(Exception):
    """An error caused by input (config, data, checkpoint) rather than by a bug."""


class ConfigError(NNSVDError, ValueError):
    """A config value that is invalid for this run (also a ValueError, for library callers)."""


class DataError(NNSVDError):
    """A dataset that is missing or unreadable."""


class ModelLoadError(NNSVDError):
    """A model or tokenizer that could not be obtained from the Hub or a local directory."""


class CheckpointError(NNSVDError):
    """A checkpoint that is missing, corrupt, or of another architecture."""


class DivergenceError(NNSVDError):
    """The training loss became NaN or infinite."""
