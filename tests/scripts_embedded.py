"""Import scripts/embedded_hub.py as a module for the in-process embedding test."""
import importlib.util
import os

_path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "embedded_hub.py")
_spec = importlib.util.spec_from_file_location("embedded_hub", _path)
assert _spec is not None and _spec.loader is not None
embedded_hub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(embedded_hub)
run = embedded_hub.run
