"""Where grulab keeps what it downloads or builds: one folder, found in one place.

``$GRULAB_CACHE``, else ``$XDG_CACHE_HOME/grulab``, else ``~/.cache/grulab``. The native
kernel's first-use builds (``native/``), the autotune record (``autotune/``) and the downloaded
corpora live under it.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """Where downloads and builds are cached: ``$GRULAB_CACHE``, else ``$XDG_CACHE_HOME/grulab``,
    else ``~/.cache/grulab``."""
    if os.environ.get("GRULAB_CACHE"):
        return Path(os.environ["GRULAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "grulab"
    return Path.home() / ".cache" / "grulab"
