"""Reader placeholder: being implemented (issue 2)."""


def visium_hd(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("visium_hd reader is not implemented yet")
