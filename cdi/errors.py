"""The one exception type for problems the user can fix."""


class CDIError(Exception):
    """A user-facing error: bad input, missing weights, impossible request.

    The message says what is wrong and what to do about it. The command line
    prints it without a traceback and exits with status 2. Anything else that
    escapes is a bug in cdi.
    """
