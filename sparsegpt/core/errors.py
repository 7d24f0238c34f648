"""Errors a user can cause. The CLI turns them into one line on stderr and exit code 2."""


class UserError(ValueError):
    """Bad input: the message names what is wrong and what would be right, in one line."""
