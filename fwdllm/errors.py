"""The one exception type that reaches a user as a message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names what is wrong and how to fix it."""
