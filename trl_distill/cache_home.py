"""Where trl_distill keeps what it can rebuild (converted real models, teacher generations): one root for all of it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """`$TRL_DISTILL_CACHE` if set, else `$XDG_CACHE_HOME/trl_distill`, else `~/.cache/trl_distill`."""
    if os.environ.get("TRL_DISTILL_CACHE"):
        return Path(os.environ["TRL_DISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trl_distill"
