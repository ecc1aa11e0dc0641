"""Loop profiles from evidence (`mythos_probe.profiles`): per group of requests (by endpoint, user
or any other attribute), the exit policy, threshold and max loops a server should run, chosen on
stored full-depth shadow forwards, with the evidence behind each choice; and the cost limits a
governor enforces.

`profiles(source, target=0.99, by="endpoint")` replays each group's shadow forwards
(`kind="shadow"`, `exit="fixed"`, recorded with the lens probe at detail="positions") as the
early-exit what-if does (`whatif._Positions`: a position exits at the first iteration its
criterion fires, at the latest at max_loops) for every candidate:

- `fixed` at max_loops m (every position runs m iterations: truncation, no exit test),
- `kl` and `latent` (replayed as `rel_residual`) at each of the what-if's default thresholds,
  each with every max_loops m,

and keeps the one with the most FLOPs saved (`whatif` formula: iterations saved × the loop's share
of the FLOPs, less the lens readouts `kl` pays every iteration) among those whose agreement with
full depth has a lower confidence bound at or above `target`. The bound is the lower of a Wilson
score bound over positions and a bootstrap percentile over requests (positions of one request
are not independent; with every position agreeing a bootstrap alone would claim 100 %). A group
with fewer than `min_requests` shadow forwards, or where no candidate's bound reaches the target,
or where none saves FLOPs, keeps full depth and says why in `note`.

The result is a `LoopProfiles`: saved as JSON (`save`), loaded by a server
(`LoopProfiles.load(path)`) that asks `budget_for(attributes)` for a request's `LoopBudget` and
`profile_for(attributes).policy` for the exit policy its batch runs. The same file declares
cost limits (`CostLimit`: FLOPs per time window per endpoint or user) that
`mythos_probe.governor.Governor` applies and `mythos_probe.budget_rules` turns into Prometheus
rules.

This module is not: the replay itself (`whatif`), the loop that runs budgets
(`model.looped`, `model.budgets`) or the governor. numpy and pandas only (torch never).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from mythos_probe import whatif
from mythos_probe.records import LoopTrace

FORMAT_VERSION = 1
POLICIES = {"fixed": None, "kl": "kl", "latent": "rel_residual"}  # policy → the replay criterion it runs
DEFAULT_MIN_REQUESTS = 8
DEFAULT_CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
OTHER_GROUP = "*"  # the profile for a group the file does not name: full depth


def wilson_lower(agree: float, n: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided Wilson score lower bound of a proportion `agree` over `n` trials."""
    if n <= 0:
        return 0.0
    z = _z(confidence)
    centre = agree + z * z / (2 * n)
    spread = z * math.sqrt(agree * (1 - agree) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(confidence)


@dataclass(frozen=True)
class Profile:
    """What one group of requests runs, and the evidence behind it."""

    group: str
    policy: str  # "fixed" | "kl" | "latent"
    max_loops: int
    exit_threshold: Optional[float] = None
    min_loops: int = 1
    forwards: int = 0  # shadow forwards (requests) replayed
    positions: int = 0  # positions replayed
    agreement: float = 1.0  # share of positions whose prediction at exit equals full depth's
    agreement_lower: float = 1.0  # its lower confidence bound
    mean_iterations: float = 0.0  # predicted iterations per position (0: no positions replayed)
    iterations_saved: float = 0.0  # predicted, share of full-depth iterations
    flops_saved: float = 0.0  # predicted, share of the forwards' FLOPs
    full_depth: int = 0  # the shadows' depth
    note: str = ""  # why it keeps full depth, when it does

    @property
    def keeps_full_depth(self) -> bool:
        return self.policy == "fixed" and self.max_loops >= self.full_depth

    def budget(self, reason: str = ""):
        from mythos_probe.model.budgets import LoopBudget

        return LoopBudget(self.max_loops, self.min_loops, self.exit_threshold, reason or f"profile {self.group}")

    def describe(self) -> str:
        evidence = (f"{self.forwards} forwards, {self.positions} positions: agreement {self.agreement:.1%} "
                    f"(lower bound {self.agreement_lower:.1%})") if self.positions else f"{self.forwards} forwards"
        if self.keeps_full_depth:
            return f"{self.group}: full depth (exit='fixed', {self.max_loops} loops): {self.note} [{evidence}]"
        th = "" if self.exit_threshold is None else f" threshold {self.exit_threshold:.3g}"
        return (f"{self.group}: exit={self.policy!r}{th}, max_loops {self.max_loops}: predicted "
                f"{self.mean_iterations:.2f} iterations per position, {self.iterations_saved:.1%} of iterations and "
                f"{self.flops_saved:.1%} of FLOPs saved [{evidence}]")


@dataclass(frozen=True)
class CostLimit:
    """At most `flops` per `window_s` seconds for requests whose attribute `key` equals `value`;
    over it, a request runs at most `degraded_max_loops` loops (`refuse=True`: it is refused)."""

    key: str  # "endpoint", "user" or any request attribute
    value: str
    flops: float
    window_s: float
    degraded_max_loops: int = 1
    refuse: bool = False

    def __post_init__(self) -> None:
        if not (self.flops > 0 and self.window_s > 0):
            raise ValueError(f"cost limit {self.key}={self.value}: flops and window_s must be positive, got "
                             f"{self.flops!r} and {self.window_s!r}")
        if isinstance(self.degraded_max_loops, bool) or not isinstance(self.degraded_max_loops, int) \
                or self.degraded_max_loops < 1:
            raise ValueError(f"cost limit {self.key}={self.value}: degraded_max_loops must be a positive integer")


@dataclass(frozen=True)
class LoopProfiles:
    """Profiles per group plus cost limits: the file a server loads."""

    by: str
    target: float
    profiles: Mapping[str, Profile]
    full_depth: int
    limits: tuple[CostLimit, ...] = ()
    confidence: float = DEFAULT_CONFIDENCE

    def profile_for(self, attributes: Mapping[str, Any]) -> Profile:
        group = str(attributes.get(self.by, ""))
        if group in self.profiles:
            return self.profiles[group]
        return Profile(OTHER_GROUP, "fixed", self.full_depth, full_depth=self.full_depth,
                       note=f"no profile for {self.by}={group!r}: full depth")

    def budget_for(self, attributes: Mapping[str, Any]):
        """The `LoopBudget` of a request with these attributes (its group's profile; full depth
        for a group the file does not name). The exit policy: `profile_for(attributes).policy`."""
        p = self.profile_for(attributes)
        return p.budget(f"profile {self.by}={p.group}")

    def with_limits(self, limits: Iterable[CostLimit]) -> "LoopProfiles":
        return dataclasses.replace(self, limits=tuple(limits))

    # -- file --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION, "by": self.by, "target": self.target, "confidence": self.confidence,
            "full_depth": self.full_depth,
            "profiles": {g: dataclasses.asdict(p) for g, p in self.profiles.items()},
            "limits": [dataclasses.asdict(lim) for lim in self.limits],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoopProfiles":
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"not a mythos-probe profiles file of format {FORMAT_VERSION} (format: "
                             f"{data.get('format')!r}); regenerate it with `mythos-probe profiles STORE`")
        profiles = {g: Profile(**p) for g, p in data["profiles"].items()}
        limits = tuple(CostLimit(**lim) for lim in data.get("limits", ()))
        return cls(data["by"], float(data["target"]), profiles, int(data["full_depth"]), limits,
                   float(data.get("confidence", DEFAULT_CONFIDENCE)))

    def save(self, path: str | Path) -> Path:
        """JSON (also valid YAML, which Prometheus-style tooling reads)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LoopProfiles":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a profiles file (JSON): {exc}") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        lines = [f"loop profiles by {self.by} at agreement ≥ {self.target:.1%} (lower {self.confidence:.0%} bound):"]
        lines += ["  " + p.describe() for p in self.profiles.values()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# choosing
# ---------------------------------------------------------------------------------------------


def candidates(traces: Sequence[LoopTrace], confidence: float = DEFAULT_CONFIDENCE, seed: int = 0):
    """Every candidate (policy, threshold, max_loops) replayed on `traces` (full-depth shadows of
    one group): a list of dicts with agreement, its lower bound, mean iterations, iterations and
    FLOPs saved, and the replay's positions and forwards."""
    pos = whatif._Positions(traces)
    P, I = pos.metrics["lens_top1_agree"].shape
    request = pos.keys["trace_id"].factorize()[0]  # one shadow forward per request
    R = int(request.max()) + 1
    per_request = np.bincount(request, minlength=R).astype(np.float64)
    steps = np.arange(I)
    total = pos.n.sum()
    runs: list[tuple[str, Optional[float], np.ndarray]] = [("fixed", None, np.full(P, I, dtype=np.int64))]
    for policy, criterion in POLICIES.items():
        if criterion is None or criterion not in pos.available:
            continue
        th = np.asarray(whatif.DEFAULT_THRESHOLDS[criterion], dtype=np.float64)
        fired = pos.fires(criterion, th) & (steps < pos.n[:, None])
        first = np.where(fired.any(-1), fired.argmax(-1), I)  # (K, P): I = never
        runs += [(policy, float(t), first[k]) for k, t in enumerate(th)]
    rows, agree_sums, used_sums = [], [], []
    for policy, threshold, first in runs:
        for m in range(1, I + 1):
            exit_at = np.minimum(np.minimum(first, m - 1), pos.n - 1)
            agree = pos.agreement(exit_at[None])[0]
            agree_sums.append(np.bincount(request, weights=agree, minlength=R))
            used_sums.append(float((exit_at + 1).sum()))
            rows.append(dict(policy=policy, exit_threshold=threshold, max_loops=m))
    A = np.array(agree_sums)  # (C, R)
    point = A.sum(1) / per_request.sum()
    rng = np.random.default_rng(seed)
    W = rng.multinomial(R, np.full(R, 1.0 / R), size=BOOTSTRAP_SAMPLES).astype(np.float64)  # (S, R)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (W @ A.T) / (W @ per_request)[:, None]  # (S, C)
    boot_lower = np.quantile(boot, 1 - confidence, axis=0)
    saved = 1.0 - np.array(used_sums) / total
    for i, row in enumerate(rows):
        lens = pos.lens_share * (1.0 - saved[i]) if row["policy"] == "kl" else 0.0
        row.update(
            agreement=float(point[i]),
            agreement_lower=min(float(boot_lower[i]), wilson_lower(float(point[i]), P, confidence)),
            mean_iterations=used_sums[i] / P, iterations_saved=float(saved[i]),
            flops_saved=float(saved[i] * pos.loop_share - lens), positions=P, forwards=R,
        )
    return rows, int(pos.n.max())


def choose(traces: Sequence[LoopTrace], group: str, target: float, confidence: float = DEFAULT_CONFIDENCE,
           min_requests: int = DEFAULT_MIN_REQUESTS) -> Profile:
    """The profile of one group (module docstring), or full depth with the reason in `note`."""
    full = [t for t in traces if t.exit_policy == whatif.BASELINE]
    depth = max((t.iterations for t in full), default=0)
    if len(full) < min_requests:
        return Profile(group, "fixed", max(depth, 1), forwards=len(full), full_depth=depth,
                       note=f"too little evidence: {len(full)} full-depth shadow forwards, at least {min_requests} "
                            "needed; record more (a kind='shadow' exit='fixed' forward beside served ones)")
    rows, depth = candidates(full, confidence)
    baseline = next(r for r in rows if r["policy"] == "fixed" and r["max_loops"] == depth)
    keep = dict(group=group, policy="fixed", max_loops=depth, full_depth=depth, forwards=baseline["forwards"],
                positions=baseline["positions"], agreement=baseline["agreement"],
                agreement_lower=baseline["agreement_lower"], mean_iterations=baseline["mean_iterations"])
    if not np.isfinite(baseline["flops_saved"]):
        return Profile(**keep, note="no recorded FLOPs (attach with the 'cost' probe): nothing to rank by")
    ok = [r for r in rows if r["agreement_lower"] >= target]
    if not ok:
        best = max(rows, key=lambda r: (r["agreement_lower"], r["flops_saved"]))
        return Profile(**keep, note=f"no candidate's agreement bound reaches {target:.1%}: the best, "
                                    f"{_name(best)}, agrees on {best['agreement']:.1%} (bound "
                                    f"{best['agreement_lower']:.1%}); record more shadows or lower the target")
    # most FLOPs saved; ties: the higher bound, then the simpler policy and the shallower budget
    order = {"fixed": 0, "latent": 1, "kl": 2}
    best = max(ok, key=lambda r: (round(r["flops_saved"], 12), r["agreement_lower"], -order[r["policy"]],
                                  -r["max_loops"]))
    if best["flops_saved"] <= 0:
        return Profile(**keep, note=f"no candidate with agreement bound ≥ {target:.1%} saves FLOPs")
    return Profile(group=group, policy=best["policy"], max_loops=best["max_loops"],
                   exit_threshold=best["exit_threshold"], full_depth=depth,
                   **{k: best[k] for k in ("forwards", "positions", "agreement", "agreement_lower",
                                           "mean_iterations", "iterations_saved", "flops_saved")})


def _name(row: Mapping[str, Any]) -> str:
    th = "" if row["exit_threshold"] is None else f" threshold {row['exit_threshold']:.3g}"
    return f"exit={row['policy']!r}{th} max_loops {row['max_loops']}"


def profiles(source, target: float = 0.99, by: str = "endpoint", confidence: float = DEFAULT_CONFIDENCE,
             min_requests: int = DEFAULT_MIN_REQUESTS, limits: Iterable[CostLimit] = ()) -> LoopProfiles:
    """Profiles per value of the request attribute `by`, from `source`: a store path (DuckDB file
    or Parquet folder) or `LoopTrace`s; only full-depth shadow forwards (`exit="fixed"`) count."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be an agreement share in (0, 1], got {target!r}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must lie in [0.5, 1), got {confidence!r}")
    traces = _shadows(source)
    groups: dict[str, list[LoopTrace]] = {}
    for t in traces:
        if by in t.attributes:
            groups.setdefault(str(t.attributes[by]), []).append(t)
    if not groups:
        raise ValueError(f"no full-depth shadow forward carries the attribute {by!r}: tag requests with "
                         f"attach(..., attributes={{{by!r}: ...}}) or choose another --by")
    chosen = {g: choose(groups[g], g, target, confidence, min_requests) for g in sorted(groups)}
    depth = max(p.full_depth for p in chosen.values())
    return LoopProfiles(by, target, chosen, depth, tuple(limits), confidence)


def _shadows(source) -> list[LoopTrace]:
    if isinstance(source, (str, Path)):
        from mythos_probe.collectors.export_cli import stored_traces
        from mythos_probe.collectors.parquet_store import open_read_only

        store = open_read_only(str(source))
        try:
            traces = [t for chunk in stored_traces(store) for _, t in chunk]
        finally:
            store.close()
    else:
        traces = list(source)
    full = [t for t in traces if t.exit_policy == whatif.BASELINE and t.detail == "positions"
            and "lens_top1_agree" in t.position_metrics]
    if not full:
        raise ValueError("no full-depth shadow forwards with lens metrics: record a forward at exit='fixed' "
                         "(kind='shadow') beside served ones, attached with probes including 'lens' and "
                         "detail='positions'")
    return full
