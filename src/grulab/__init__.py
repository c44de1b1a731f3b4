"""grulab: gated recurrent units to learn from and to train fast on a CPU.

>>> import grulab
>>> gru = grulab.GRU(28, 256)          # a drop-in for torch.nn.GRU

The names below are imported on first use, so that ``grulab.onnx_generate``
(generation through onnxruntime) runs without importing torch.
"""
from importlib import import_module

from .errors import GrulabError

__version__ = "0.1.0"
_LAZY = {"GRU": ".gru", "GRUCell": ".gru", "MinGRU": ".mingru", "MinGRUBlocks": ".mingru",
         "export_onnx": ".export"}  # name -> module that defines it
__all__ = ["GRU", "GRUCell", "GrulabError", "MinGRU", "MinGRUBlocks", "export_onnx", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
