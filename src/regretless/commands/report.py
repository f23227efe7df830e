"""regretless report (not implemented yet)."""

from regretless.errors import UserError


def add_arguments(p):
    pass


def run(args):
    raise UserError("'report' is not implemented yet")
