"""Project exception types. The CLI and DAG tasks turn them into one clear line."""


class SaePipelineError(Exception):
    """Base class: an error whose message is fit to show a user as is."""


class ConfigError(SaePipelineError):
    """A configuration value is missing, of the wrong type or impossible."""


class DataError(SaePipelineError):
    """Input data cannot be read or breaks the data contract."""


class RegistryError(SaePipelineError):
    """The MLflow registry is not in the state a step needs."""


class DeviceError(SaePipelineError):
    """The device a task must run on is not usable on this worker (no CUDA, hidden GPUs, a
    driver too old): a retry on the same worker fails the same way."""
