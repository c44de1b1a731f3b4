"""The modules that moved into subpackages, still importable by their old names.

``import grulab.train`` (or ``from grulab import checkpoint``) gives the module now at
``grulab.lm.train`` (the same module object, so monkeypatching either name patches both),
with a DeprecationWarning that names the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old name -> where it lives now
    "grulab.fused": "grulab.kernels.fused", "grulab.native": "grulab.kernels.native",
    "grulab.autotune": "grulab.kernels.autotune", "grulab.threads": "grulab.kernels.threads",
    "grulab.config": "grulab.lm.config", "grulab.data": "grulab.lm.data", "grulab.model": "grulab.lm.model",
    "grulab.train": "grulab.lm.train", "grulab.generate": "grulab.lm.generate",
    "grulab.checkpoint": "grulab.lm.checkpoint", "grulab.rundir": "grulab.lm.rundir",
    "grulab.signals": "grulab.lm.signals", "grulab.distributed": "grulab.lm.distributed",
    "grulab.compare": "grulab.lm.compare", "grulab.validate": "grulab.lm.validate",
    "grulab.plots": "grulab.lm.plots", "grulab.export": "grulab.deploy.export",
    "grulab.onnx_generate": "grulab.deploy.onnx_generate", "grulab.onnx_cli": "grulab.deploy.onnx_cli",
    "grulab.viz": "grulab.views.viz", "grulab.catmouse": "grulab.views.catmouse",
}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):  # the module ran when it was imported by its new name
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
