"""The pinned environment: monailabel 0.8.5 imports (it breaks under pydicom 3)."""

import importlib


def test_monailabel_app_imports():
    server = importlib.import_module("monailabel.app")  # the FastAPI server module that start_server runs
    assert hasattr(server, "app")
    assert hasattr(importlib.import_module("monailabel.interfaces.app"), "MONAILabelApp")  # what the app builds on

    import pydicom

    assert int(pydicom.__version__.split(".")[0]) < 3
