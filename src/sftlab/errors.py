"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class SftlabError(Exception):
    """An error the user can fix; the message says where and what to do."""


class ConfigError(SftlabError):
    pass


class DataError(SftlabError):
    pass


class ModelError(SftlabError):
    pass


class CheckpointError(SftlabError):
    """A checkpoint that cannot be written (a full disk) or resumed from (damaged, incomplete, unsafe)."""
