"""grulab: gated recurrent units to learn from and to train fast on a CPU.

>>> import grulab
>>> gru = grulab.GRU(28, 256)          # a drop-in for torch.nn.GRU
"""
from .errors import GrulabError
from .gru import GRU, GRUCell
from .mingru import MinGRU, MinGRUBlocks

__version__ = "0.1.0"
__all__ = ["GRU", "GRUCell", "GrulabError", "MinGRU", "MinGRUBlocks", "__version__"]
