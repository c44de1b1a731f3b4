"""``python -m grulab`` is the ``grulab`` command."""
import sys

from .cli import main

sys.exit(main())
