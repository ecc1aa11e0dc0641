"""The dashboard's pages, in navigation order. Each module defines `PATH`, `TITLE`, `layout()`,
plain `update(...)` functions and `register(app, store)` for its own callbacks; component ids are
prefixed by the module name.
"""

from mythos_probe.dashboards.pages import (
    budgets, convergence, cost, experts, forward, forwards, halting, lens, loops, spectral,
)
from mythos_probe.dashboards.pages import trajectories  # issue 25

PAGES = (forwards, forward, convergence, loops, halting, spectral, experts, cost, budgets, lens)
PAGES += (trajectories,)  # issue 25: appended, so other branches' pages merge beside it
