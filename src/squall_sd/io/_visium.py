"""Reader placeholder: being implemented (issue 2)."""


def visium(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("visium reader is not implemented yet")
