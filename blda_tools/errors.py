"""The one exception type users see: a clear message naming the file, field or option."""


class BLDAError(Exception):
    """Bad input or an unusable file, with a message meant for the user.

    The CLI prints the message (no traceback) and exits with status 2. Library callers can catch
    it like any exception.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job that keeps its work: the message says what was kept and how to
    continue (e.g. "12 of 40 images kept in val.h5.partial; rerun with --resume").

    A `KeyboardInterrupt`, so code that stops on Ctrl-C still does; the CLI prints the message
    in one line and exits with status 130 (as a shell does for SIGINT).
    """
