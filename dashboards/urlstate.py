"""Every control's value lives in the page URL's query string, so a link reproduces the view and
the browser's back button steps back through filter changes.

`KEYS` names each value, its default and whether it holds several; `parse` reads a query string
into a complete state (defaults filled in, unreadable values reported), `encode` writes a state
back leaving defaults out. Controls carry ids `{"type": "ctl", "key": <key>}` (see `control_id`);
the app's one sync callback moves values between them and the URL.

This module is not the filter semantics (`filters.py` turns a state into a `queries.Selection`)
nor any widget.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode

from mythos_probe.dashboards.queries import GROUP_COLUMNS, WINDOWS
from mythos_probe.records import FORWARD_KINDS, ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES
from mythos_probe.whatif import CRITERIA


@dataclass(frozen=True)
class Key:
    default: Any
    multi: bool = False
    cast: Callable[[str], Any] = str
    # The values a link may hold, where they are a fixed list: anything else is named as a problem
    # and the default kept (a dropdown given an unknown value would show blank and match nothing).
    choices: tuple | None = None


def grouping(text: str) -> str:
    """A Group-by value: nothing, a forward column, or `attr:<key>` (the keys change with the store)."""
    if text in ("none", *GROUP_COLUMNS) or (text.startswith("attr:") and len(text) > 5):
        return text
    raise ValueError(text)


def number(text: str) -> float:
    """A finite float: "nan" or "inf" in a link is a mistake, not a range (it would match nothing)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


KEYS: dict[str, Key] = {
    # the filter bar (every page)
    "model": Key((), multi=True),
    "run": Key((), multi=True),
    "kind": Key("served", choices=(*FORWARD_KINDS, "all")),  # "all" for every forward kind
    "loop": Key((), multi=True),
    "rank": Key((), multi=True, cast=int),
    "policy": Key((), multi=True),
    "imin": Key(None, cast=int),
    "imax": Key(None, cast=int),
    "window": Key("all", choices=tuple(WINDOWS)),
    "from": Key(None),
    "to": Key(None),
    "attr": Key(None),
    "val": Key((), multi=True),
    "group": Key("none", cast=grouping),
    # the selected forward (forward detail, lens heatmap)
    "trace": Key(None),
    # page controls
    "x": Key("step", choices=("step", "time")),  # spectral: over step or time
    "metric": Key("rel_residual", choices=POSITION_METRIC_NAMES),  # forward: heatmap metric
    "batch": Key(0, cast=int),  # forward: batch row
    "criterion": Key("kl", choices=CRITERIA),  # lens: what-if table criterion
    "target": Key(0.99, cast=number),  # lens: agreement target
    "tmin": Key(None, cast=number),  # lens: threshold range of the chosen criterion
    "tmax": Key(None, cast=number),
    "from2": Key(None),  # convergence: a second time range to compare against
    "to2": Key(None),
    # compare (issue 25): A and B, each a trace id or a run id; the per-iteration metrics overlaid
    "a": Key(None),
    "b": Key(None),
    "cmp": Key(("rel_residual", "state_norm", "halted_fraction", "lens_kl_final"), multi=True,
               choices=ITERATION_METRIC_NAMES),
}


def control_id(key: str) -> dict:
    if key not in KEYS:
        raise ValueError(f"no URL key {key!r}")
    return {"type": "ctl", "key": key}


def parse(search: str | None) -> tuple[dict[str, Any], list[str]]:
    """(state with every key, problems): a value that cannot be read keeps its default and is
    named in `problems`, so a mistyped link says so instead of silently showing something else."""
    raw = parse_qs((search or "").lstrip("?"), keep_blank_values=False)
    state = {k: key.default for k, key in KEYS.items()}
    problems = []
    for name, values in raw.items():
        key = KEYS.get(name)
        if key is None:
            problems.append(f"unknown URL parameter {name!r}")
            continue
        try:
            cast = [key.cast(v.strip()) for v in values]
        except ValueError:
            problems.append(f"URL parameter {name}={values[0]!r} is not a valid {key.cast.__name__}")
            continue
        wrong = [v for v in cast if key.choices is not None and v not in key.choices]
        if wrong:
            problems.append(f"URL parameter {name}={wrong[0]!r} is not one of {', '.join(map(str, key.choices))}")
            continue
        state[name] = tuple(cast) if key.multi else cast[-1]
    return state, problems


def encode(state: dict[str, Any]) -> str:
    """The query string ("?…" or "") holding every non-default value of `state`, in `KEYS` order."""
    pairs = []
    for name, key in KEYS.items():
        value = state.get(name, key.default)
        if key.multi:
            value = tuple(value or ())
        if value in (None, "", key.default, ()):
            continue
        pairs += [(name, str(v)) for v in value] if key.multi else [(name, str(value))]
    return "?" + urlencode(pairs) if pairs else ""


def with_values(search: str | None, **values) -> str:
    """`search` with some keys replaced (`from_`/`to` spelled with a trailing underscore allowed)."""
    state, _ = parse(search)
    state.update({k.rstrip("_"): v for k, v in values.items()})
    return encode(state)
