"""The one exception type users see: a clear message naming the file, field or option."""


class BLDAError(Exception):
    """Bad input or an unusable file, with a message meant for the user.

    The CLI prints the message (no traceback) and exits with status 2. Library callers can catch
    it like any exception.
    """
