"""Where a probe's warning points: the `stacklevel` that names the first frame outside
mythos_probe and torch, so the warning shows the user's line that ran the model (or, for a hook
inside the loop, the model's own line that ran the step), not torch's module machinery or ours.

A fixed stacklevel cannot: how many of torch's frames lie between a hook and the user's call
depends on the hook kind and the torch version.

This module is not: the warnings' texts (each lives beside the check that raises it).
"""

from __future__ import annotations

import importlib.util
import os
import sys

# ".../mythos_probe/" and ".../torch/", found without importing torch: the collectors use this and
# never import it (a `server` install has no torch)
_TORCH = importlib.util.find_spec("torch")
_INTERNAL = tuple(os.path.dirname(path) + os.sep
                  for path in (os.path.abspath(__file__), *([_TORCH.origin] if _TORCH and _TORCH.origin else [])))


def outside() -> int:
    """The `stacklevel` at which `warnings.warn`, called by the function calling this, names the
    first frame outside mythos_probe and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
