"""Reader placeholder: being implemented (issue 2)."""


def legacy_st(*args, **kwargs):  # noqa: D103
    raise NotImplementedError("legacy_st reader is not implemented yet")
