"""Reader placeholder: being implemented (issue 2)."""


def he(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("he reader is not implemented yet")
