"""Reader placeholder: being implemented (issue 2)."""


def xenium(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("xenium reader is not implemented yet")
