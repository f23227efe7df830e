"""The one exception type users see. The CLI prints it as a single line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong, where (file:line or field) and what was expected."""
