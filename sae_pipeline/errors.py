"""Project exception types. The CLI and DAG tasks turn them into one clear line."""


class SaePipelineError(Exception):
    """Base class: an error whose message is fit to show a user as is."""


class ConfigError(SaePipelineError):
    """A configuration value is missing, of the wrong type or impossible."""


class DataError(SaePipelineError):
    """Input data cannot be read or breaks the data contract."""


class RegistryError(SaePipelineError):
    """The MLflow registry is not in the state a step needs."""
