"""One exception type per kind of failure.

Every message names the file, tensor, rank or host involved and, where it can, what to do.
All derive from TPRuntimeError so that the CLI can print them without a traceback.
"""


class TPRuntimeError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(TPRuntimeError):
    """config.json, a flag or a combination of them cannot be run."""


class ShardingError(TPRuntimeError):
    """The requested parallel layout cannot split this model."""


class CheckpointError(TPRuntimeError):
    """Checkpoint files are missing, corrupt, or do not match the config."""


class GenerationError(TPRuntimeError):
    """A request cannot be served (prompt too long, empty prompt, ...)."""


class LaunchError(TPRuntimeError):
    """A rank failed or could not be started; the message names the rank and cause."""


class WorkerError(TPRuntimeError):
    """A remote worker misbehaved, died or never connected."""
