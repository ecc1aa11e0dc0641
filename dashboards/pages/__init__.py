"""The dashboard's pages, in navigation order. Each module defines `PATH`, `TITLE`, `layout()`,
plain `update(...)` functions and `register(app, store)` for its own callbacks; component ids are
prefixed by the module name.
"""

from mythos_probe.dashboards.pages import (
    budgets, compare, convergence, cost, depth, experts, forward, forwards, halting, lens, loops, spectral, sweep,
)
from mythos_probe.dashboards.pages import trajectories  # issue 25

PAGES = (forwards, forward, convergence, loops, halting, spectral, experts, cost, budgets, lens, depth, sweep, compare,
         trajectories)
