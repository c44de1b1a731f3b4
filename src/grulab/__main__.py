"""``python -m grulab`` is the ``grulab`` command."""
import sys

from grulab.cli import main

sys.exit(main())
