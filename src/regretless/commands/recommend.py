"""regretless recommend (not implemented yet)."""

from regretless.errors import UserError


def add_arguments(p):
    pass


def run(args):
    raise UserError("'recommend' is not implemented yet")
