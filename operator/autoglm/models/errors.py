"""What a checkpoint or a version can be refused for: one line each, never a traceback."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported or served; the message says why in one line."""


class UnsupportedConfig(CheckpointError):
    """A config.json this code does not implement (architecture, rope type, activation, …)."""
