"""grulab: gated recurrent units to learn from and to train fast on a CPU.

>>> import grulab
>>> gru = grulab.GRU(28, 256)          # a drop-in for torch.nn.GRU

The package is layered; each layer imports only those below it (``make test`` checks it):

    grulab.cli                      the command line
    grulab.views | grulab.deploy    the gate page, figures, cat/mouse | ONNX export and runtime
    grulab.lm                       the character-level language model: data, model, training, runs
    grulab.mingru, grulab.gru       the nn layer: MinGRU; GRU and GRUCell (drop-ins for torch.nn)
    grulab.kernels                  who computes a GRU: dispatch, autotune, threads, the operator, C++
    grulab.reference, .cache, .errors   the notes' equations; the cache folder; user errors

The names below are imported on first use, so that ``import grulab`` loads no layer it does
not need, and ``grulab.deploy.onnx_generate`` runs without torch.
"""
from importlib import import_module

from grulab import _moved
from grulab.errors import GrulabError

__version__ = "0.1.0"
_LAZY = {"GRU": "grulab.gru", "GRUCell": "grulab.gru", "MinGRU": "grulab.mingru",
         "MinGRUBlocks": "grulab.mingru", "export_onnx": "grulab.deploy.export"}  # name -> its module
__all__ = ["GRU", "GRUCell", "GrulabError", "MinGRU", "MinGRUBlocks", "export_onnx", "__version__"]

_moved.install()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
