"""Errors raised by deltatune. All user-facing errors are ``ValueError`` subclasses so that
callers who catch ``ValueError`` for bad input keep working."""


class DeltatuneError(ValueError):
    """Bad input: the message says what was wrong and what would be right."""


class AdapterFileError(DeltatuneError):
    """An adapter file or folder cannot be loaded; the model was left unchanged."""
