"""The one exception type that the CLI turns into a one-line error."""


class QavtpError(Exception):
    """A problem with the user's input or environment, stated in one line."""
