"""The error types of the data package."""


class DataSourceError(FileNotFoundError):
    """Input data that is missing or malformed; the message says what to provide (exit 2)."""


class DamagedDataError(DataSourceError):
    """A data file whose content is not what its index says: an ``index.json`` that is not a
    shard index, a tar that holds more samples than its index lists (another shard's, or a
    rewritten one), or an evaluation split read short of its index. Exit 4, like a damaged
    checkpoint: the file is there but cannot be trusted."""
