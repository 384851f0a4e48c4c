"""Errors that mean a user mistake: the CLI prints the message as one sentence and exits with code 2."""


class JaxloraError(Exception):
    """A user mistake (bad config, data or checkpoint): one sentence, exit code 2, no traceback."""


class ConfigError(JaxloraError):
    """An invalid or inconsistent configuration."""


class DataError(JaxloraError):
    """A missing, malformed or empty data file or split."""


class CheckpointError(JaxloraError):
    """A missing, incomplete or mismatched checkpoint (HF or Orbax)."""
