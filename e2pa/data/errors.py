"""The one error type the data layer raises for bad input data."""


class DataError(ValueError):
    """A data file or data set is missing, unreadable or inconsistent.

    The message names the offending file (or case) and says what is wrong with it, so that a
    command-line tool can print it as is; it subclasses :class:`ValueError` so that callers that
    already handle bad values keep working.
    """
