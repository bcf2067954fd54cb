"""The one exception type that the CLI turns into a one-line error message."""


class SslabError(Exception):
    """A user-facing error: its message says what is wrong and what to do about it."""


class ConfigError(SslabError, ValueError):
    """An invalid configuration value, option or file."""


class DatasetError(SslabError):
    """A dataset that cannot be found or read."""


class AugmentError(ConfigError):
    """An unknown augmentation op or a bad op parameter."""
