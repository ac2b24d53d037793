"""Every error a user can fix: the CLI prints the message as one `error:` line and exits 2.

Each message names the problem and the fix. Anything else is a bug and keeps its traceback.
"""


class SentimentError(Exception):
    """Any problem a user can fix (bad flag, file, data, checkpoint): one line, no traceback."""


class ConfigError(SentimentError, ValueError):
    """A bad config value, key or file, or a flag combination that cannot work."""


class DataError(SentimentError, ValueError):
    """Bad or missing data: the message names the file, the problem and the fix."""


class ModelError(SentimentError, ValueError):
    """The model or tokenizer could not be loaded: the message says what to pass instead."""


class CheckpointError(SentimentError):
    """A checkpoint or run folder that cannot be used: the message says which file and what to do."""


class TrainingError(SentimentError):
    """Training cannot go on (repeated non-finite steps, out of memory): the message says why and what to try."""
