"""The one error type of the data package."""


class DataSourceError(FileNotFoundError):
    """Input data that is missing or malformed; the message says what to provide."""
