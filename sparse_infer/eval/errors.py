"""The one exception the eval commands raise for a bad request."""


class EvalError(ValueError):
    """A user-facing problem with an evaluation request (bad task, length, file...)."""
