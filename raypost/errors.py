"""Errors a user can act on: the CLI prints them as one message, without a traceback."""


class StageError(RuntimeError):
    """A stage that cannot go on (exit status 1); bad input is RecipeError/DataError (status 2)."""
