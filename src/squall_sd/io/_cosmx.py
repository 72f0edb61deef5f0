"""Reader placeholder: being implemented (issue 2)."""


def cosmx(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("cosmx reader is not implemented yet")
