"""`dashboards/queries.py`: the defaults the pages rely on (how many buckets, rows and forwards a view
asks for) pinned, and the guards and edges the numpy comparison in test_queries_numpy.py does not
reach. Written against survivors of `scripts/mutation.sh dashboards/queries.py`."""

from __future__ import annotations

import inspect

from mythos_probe.dashboards import queries as Q


def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_view_defaults():
    assert defaults(Q.spectral_bands) == {"buckets": 80}
    assert defaults(Q.diverged_points) == {"limit": 2000}
    assert defaults(Q.divergences) == {"limit": 50}
    assert defaults(Q.cost_over_time) == {"buckets": 60}
    assert defaults(Q.position_means) == {"per_group": 500, "groups": 2}
    assert defaults(Q.attribute_values) == {"limit": 200}
    assert defaults(Q.forward_list) == {"sort": None, "filters": None, "offset": 0, "limit": 100}
    assert defaults(Q.select) == {"params": ()}
    assert defaults(Q._select_rolled) == {"params": ()}
    assert defaults(Q._list_sql) == {"count": False}
    assert defaults(Q._per_forward_peaks) == {"where": "TRUE"}
