import importlib

import squall_sd as squall


def test_namespaces():
    for name in ["io", "pp", "tl", "pl", "models", "datasets", "train"]:
        assert getattr(squall, name) is importlib.import_module(f"squall_sd.{name}")


def test_logger_is_named_squall():
    assert squall.logger.name == "squall"
