"""The one record that flows from model to probes to collectors to dashboard: `LoopTrace`.

A `LoopTrace` describes one forward pass of a looped model (one decode step during generation,
one optimizer step during training): who ran it, what shape and loop budget it had, and what every
loop iteration did, as plain numpy arrays and primitives. Probes build it; collectors turn it into
OpenTelemetry spans and DuckDB rows; the dashboard reads those rows.

The metric vocabulary lives here too (`ITERATION_METRICS`, `POSITION_METRICS`, `FORWARD_METRICS`):
the DuckDB table columns and the span attribute names are derived from these tuples, so adding a
metric is one line here plus its formula in `mythos_probe/metrics/`.

This module is not: the metric formulas (`mythos_probe.metrics`), the OTel mapping
(`mythos_probe.collectors.spans`) or the table layout (`mythos_probe.collectors.schema`).
It imports numpy only, so collectors and the dashboard never pull in torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

SCHEMA_VERSION = 2
"""Bumped when a field or metric changes meaning; stores record it per row.

1: the first record. 2: adds `loop_name`, `kind` and the rank family (`rank`, `local_rank`,
`world_size`, `host`, `pid`, `job_id`); a version-1 record reads as their defaults."""

FORWARD_KINDS = ("served", "shadow", "training")
"""`served`: a forward the user's traffic ran. `shadow`: a full-depth baseline run beside it for the
what-if. `training`: a forward of an optimizer step. Dashboards show `served` by default."""

DETAIL_LEVELS = ("summary", "positions")
"""`summary`: per-iteration scalars only. `positions`: also batch × seq × iteration arrays."""


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    source: str


def _m(name: str, description: str, source: str) -> Metric:
    return Metric(name, description, source)


# Per iteration: one float per loop iteration executed, averaged over all positions unless the
# description says otherwise (positions frozen by an exit policy count with a zero step). NaN where a metric is undefined (t = 0 for step metrics,
# or the probe that makes it was not enabled).
ITERATION_METRICS: tuple[Metric, ...] = (
    # convergence
    _m("rel_residual", "‖h_t − h_{t−1}‖ / ‖h_t‖, mean over positions", "Geiping et al. 2025 (Huginn) §6"),
    _m("cos_step", "1 − cos(h_t, h_{t−1}), mean over positions", "Geiping et al. 2025 §6"),
    _m("dist_to_final", "‖h_t − h_T‖ / ‖h_T‖, mean over 1 position in 16 (at least 4, evenly spaced, last included) from bfloat16 copies of h_t: error ≤ 2⁻⁸‖h_t‖/‖h_T‖", "Geiping et al. 2025 §6"),
    _m("step_orthogonality", "cos(Δ_t, Δ_{t−1}) with Δ_t = h_t − h_{t−1}", "Geiping et al. 2025 §6 (orbits)"),
    _m("token_correlation", "mean pairwise cosine between sampled positions (rank collapse)", "Dong et al. 2021"),
    # spectral stability
    _m("state_norm", "mean ‖h_t‖ over positions", "Prairie et al. 2026 (Parcae) §3"),
    _m("growth_ratio", "‖h_t‖ / ‖h_{t−1}‖, mean over positions", "Prairie et al. 2026 §3"),
    _m("norm_decay", "mean ‖A⊙h_{t−1}‖", "open_mythos LTIInjection"),
    _m("norm_inject", "mean ‖B⊙e‖", "open_mythos LTIInjection"),
    _m("norm_block", "mean ‖block output (with LoRA)‖", "open_mythos LTIInjection"),
    _m("jacobian_sigma_max", "σ_max(∂h_{t+1}/∂h_t) by power iteration (opt-in)", "Prairie et al. 2026 §3"),
    _m("nonfinite_fraction", "share of positions whose state holds a NaN or ±Inf", "mythos-probe"),
    # halting
    _m("halt_prob", "mean ACT halting probability p_t", "Graves 2016 §2"),
    _m("cum_halt", "mean cumulative halting probability", "Graves 2016 §2"),
    _m("halted_fraction", "share of positions halted after iteration t", "Graves 2016 §2"),
    _m("act_weight", "mean ACT weight given to h_t in the output", "Graves 2016 eq. 7"),
    _m("halt_low_share", "share of p_t < 0.01", "Banino et al. 2021 (PonderNet) §4"),
    _m("halt_high_share", "share of p_t > 0.99", "Banino et al. 2021 §4"),
    _m("exit_count", "positions whose last iteration is t (iterations used = t + 1)", "mythos-probe"),
    # experts
    _m("expert_max_vio", "max load / mean load − 1 over routed experts", "Wang et al. 2024 (aux-loss-free) §4"),
    _m("expert_cv", "coefficient of variation of expert loads", "Shazeer et al. 2017 §4"),
    _m("expert_load_entropy", "entropy of the load distribution / log(n_experts)", "mythos-probe"),
    _m("expert_dead", "routed experts with zero load", "mythos-probe"),
    _m("expert_active_ratio", "share of routed experts with non-zero load", "mythos-probe"),
    _m("routing_entropy", "mean entropy of the router softmax per token", "Shazeer et al. 2017"),
    _m("bias_changed_share", "share of top-k choices changed by router_bias", "Wang et al. 2024 §3"),
    _m("shared_routed_ratio", "mean ‖shared expert output‖ / ‖routed output‖", "Dai et al. 2024 (DeepSeekMoE)"),
    _m("topk_overlap", "|topk_t ∩ topk_{t−1}| / k, mean over tokens", "mythos-probe"),
    # coda lens
    _m("lens_kl_final", "KL(p_T ‖ p_t) of coda-lens distributions", "nostalgebraist 2020 (logit lens)"),
    _m("lens_kl_prev", "KL(p_t ‖ p_{t−1}) of coda-lens distributions", "Geiping et al. 2025 §7 (exit)"),
    _m("lens_entropy", "entropy of the coda-lens distribution", "Belrose et al. 2023 (tuned lens)"),
    _m("lens_top1_agree", "share of sampled positions whose lens argmax equals the final one", "Belrose et al. 2023"),
    _m("lens_final_rank", "mean rank of the final argmax token under the lens", "Belrose et al. 2023"),
    # depth-wise LoRA
    _m("lora_rel_norm", "‖LoRA delta‖ / ‖block output‖", "Bae et al. 2024 (Relaxed Recursive) §3"),
)

# Per position and iteration (batch × seq × iterations), only at detail="positions".
POSITION_METRICS: tuple[Metric, ...] = (
    _m("rel_residual", "‖h_t − h_{t−1}‖ / ‖h_t‖", "Geiping et al. 2025 §6"),
    _m("cos_step", "1 − cos(h_t, h_{t−1})", "Geiping et al. 2025 §6"),
    _m("state_norm", "‖h_t‖", "Prairie et al. 2026 §3"),
    _m("halt_prob", "ACT halting probability p_t", "Graves 2016 §2"),
    _m("cum_halt", "cumulative halting probability", "Graves 2016 §2"),
    _m("act_weight", "ACT weight of h_t in the output", "Graves 2016 eq. 7"),
    # coda lens, NaN where the position was not sampled by the lens probe
    _m("lens_kl_final", "KL(p_T ‖ p_t) to the model's output distribution", "nostalgebraist 2020"),
    _m("lens_kl_prev", "KL(p_t ‖ p_{t−1}) between successive iterations", "Geiping et al. 2025 §7"),
    _m("lens_entropy", "entropy of p_t", "Belrose et al. 2023"),
    _m("lens_argmax", "token id of argmax p_t", "Belrose et al. 2023"),
    _m("lens_top1_agree", "1 when argmax p_t equals the model's output argmax", "Belrose et al. 2023"),
    # latent trajectory (opt-in probe "trajectory", `metrics/trajectory.py`): PCA of the position's own
    # states h_0 … h_{I−1}, centred; the shares repeat along the iterations (one value per position)
    _m("traj_pc1", "projection of h_t onto the position's 1st principal direction (centred, U√λ)", "Geiping et al. 2025 §6"),
    _m("traj_pc2", "projection of h_t onto the position's 2nd principal direction", "Geiping et al. 2025 §6"),
    _m("traj_pc3", "projection of h_t onto the position's 3rd principal direction", "Geiping et al. 2025 §6"),
    _m("traj_pc1_share", "share of the trajectory's variance the 1st direction explains (λ₁/Σλ)", "Geiping et al. 2025 §6"),
    _m("traj_pc2_share", "share of the trajectory's variance the 2nd direction explains", "Geiping et al. 2025 §6"),
    _m("traj_pc3_share", "share of the trajectory's variance the 3rd direction explains", "Geiping et al. 2025 §6"),
    _m("traj_fixed", "1 where h_t is on its fixed point: every later relative step ‖h_u − h_{u−1}‖/‖h_u‖ (u > t; "
       "the last iteration: its own) is ≤ 1e-3, else 0", "Geiping et al. 2025 §6"),
)

# One value per forward.
FORWARD_METRICS: tuple[Metric, ...] = (
    _m("rho_A", "spectral radius of the injection matrix Ā = max_i A_i", "Prairie et al. 2026 §3"),
    _m("mean_contraction", "mean_i A_i of the diagonal injection", "Prairie et al. 2026 §3"),
    _m("mean_iterations", "mean iterations used per position", "mythos-probe"),
    _m("ponder_cost", "mean ACT ponder cost N + R", "Graves 2016 §3"),
    _m("remainder_mass", "mean ACT remainder R", "Graves 2016 §2"),
    _m("halted_first_share", "share of positions halting at the first iteration", "Banino et al. 2021"),
    _m("reached_last_share", "share of positions still running at the last iteration", "Banino et al. 2021"),
    _m("diverged_at", "first iteration with a NaN/Inf state, −1 when none", "mythos-probe"),
    _m("flops", "estimated FLOPs of the forward from the config and iterations executed", "Kaplan et al. 2020 §2.1"),
    _m("flops_saved", "share of loop FLOPs saved versus running n_loops on every position", "mythos-probe"),
    _m("loop_flops", "the part of flops spent in the loop (executed iterations, every position)", "Kaplan et al. 2020 §2.1"),
    _m("useful_flops", "FLOPs had each position run only the iterations it used", "Kaplan et al. 2020 §2.1"),
    _m("lens_flops", "FLOPs of one coda-lens readout (coda, norm, head) of every position: the price per iteration "
       "of an exit policy that reads the lens", "Kaplan et al. 2020 §2.1"),
)

ITERATION_METRIC_NAMES = tuple(m.name for m in ITERATION_METRICS)
POSITION_METRIC_NAMES = tuple(m.name for m in POSITION_METRICS)
FORWARD_METRIC_NAMES = tuple(m.name for m in FORWARD_METRICS)

AttributeValue = str | bool | int | float

INT32_MAX = 2**31 - 1  # batch, seq_len, n_loops, iterations, ranks: INTEGER columns of the store
INT64_MAX = 2**63 - 1  # timestamps, steps, pids: BIGINT columns


class InvalidRecord(ValueError, TypeError):
    """A value a `LoopTrace` cannot hold; the message names the field. A ValueError (the receiver
    answers 400 with it) and a TypeError (for a value of the wrong type, as Python raises)."""


def _integer(lo: int, hi: int):
    def check(name: str, value: Any) -> int:
        if type(value) is not int:  # the common case first: this runs ~10 times per trace
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidRecord(f"{name} must be an integer, got {value!r}")
            value = int(value)
        if not lo <= value <= hi:
            raise InvalidRecord(f"{name} = {value} is outside [{lo}, {hi}]")
        return value

    return check


def _text(empty: bool):
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or not (empty or value):
            raise InvalidRecord(f"{name} must be a{'' if empty else ' non-empty'} string, got {value!r}")
        return value

    return check


def _hex_id(chars: int):
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or len(value) != chars or value.strip("0123456789abcdef") or not value.strip("0"):
            raise InvalidRecord(f"{name} must be {chars} lowercase hex characters, not all zero (an OTel id), got {value!r}")
        return value

    return check


def _one_of(choices: tuple[str, ...]):
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise InvalidRecord(f"{name} must be one of {choices}, got {value!r}")
        return value

    return check


def _schema_version(name: str, value: Any) -> int:
    version = _integer(-INT64_MAX - 1, INT64_MAX)(name, value)
    if not 1 <= version <= SCHEMA_VERSION:
        raise InvalidRecord(
            f"{name} = {version}: this mythos-probe reads record versions 1 to {SCHEMA_VERSION}"
            + ("; upgrade mythos-probe to read newer records" if version > SCHEMA_VERSION else "")
        )
    return version


_ATTRIBUTE_TYPES = frozenset((str, bool, int, float))


def _attributes(name: str, value: Any) -> dict[str, AttributeValue]:
    if type(value) is not dict and not isinstance(value, Mapping):
        raise InvalidRecord(f"{name} must be a mapping of str to str, bool, int or float, got {type(value).__name__}")
    for key, item in value.items():
        if type(key) is not str or not key:
            raise InvalidRecord(f"{name} keys must be non-empty strings, got {key!r}")
        if type(item) not in _ATTRIBUTE_TYPES and not isinstance(item, (str, bool, int, float)):
            raise InvalidRecord(f"attribute {key!r} must be str, bool, int or float, got {type(item).__name__}")
    return dict(value)


# The checks of the record's scalar fields, one per field name: `LoopTrace` runs them on
# construction (in-process and off the wire alike: the receiver decodes into a `LoopTrace`), and
# `attach` runs the same ones on its options through `check_field`, so a bad `run_id` fails where
# it is passed, naming the field, and never inside Arrow at write time.
FIELD_CHECKS = {
    "trace_id": _hex_id(32),
    "span_id": _hex_id(16),
    "run_id": _text(empty=False),
    "model_id": _text(empty=False),
    "step": _integer(-INT64_MAX, INT64_MAX),
    "start_ns": _integer(0, INT64_MAX),
    "end_ns": _integer(0, INT64_MAX),
    "batch": _integer(0, INT32_MAX),
    "seq_len": _integer(0, INT32_MAX),
    "n_loops": _integer(0, INT32_MAX),
    "iterations": _integer(0, INT32_MAX),
    "exit_policy": _text(empty=False),
    "detail": _one_of(DETAIL_LEVELS),
    "attributes": _attributes,
    "schema_version": _schema_version,
    "loop_name": _text(empty=False),
    "kind": _one_of(FORWARD_KINDS),
    "rank": _integer(0, INT32_MAX),
    "local_rank": _integer(0, INT32_MAX),
    "world_size": _integer(1, INT32_MAX),
    "host": _text(empty=True),
    "pid": _integer(0, INT64_MAX),
    "job_id": _text(empty=True),
}


def check_field(name: str, value: Any, label: str | None = None) -> Any:
    """`value` as a `LoopTrace` holds field `name` (numpy integers become int), or `InvalidRecord`
    naming the field (as `label` where the caller knows it by another name, e.g. a span attribute)."""
    return FIELD_CHECKS[name](label or name, value)


def _frozen_array(a: Any, dtype) -> np.ndarray:
    arr = np.array(a, dtype=dtype, copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class LoopTrace:
    """One forward of a looped model, reduced to what the probes measured.

    Arrays are read-only numpy; per-iteration arrays have length `iterations`.
    """

    # identity
    trace_id: str  # 32 lowercase hex chars (OTel trace id)
    span_id: str  # 16 lowercase hex chars (OTel span id)
    run_id: str
    model_id: str
    step: int  # decode step in generation, optimizer step in training, else the forward index
    start_ns: int  # wall clock, ns since the epoch
    end_ns: int
    # shape and budget
    batch: int
    seq_len: int
    n_loops: int  # requested
    iterations: int  # executed (≤ n_loops when every position halted early)
    exit_policy: str  # "act" | "fixed" | "kl" | "latent" | "unknown"
    detail: str  # one of DETAIL_LEVELS
    iteration_metrics: Mapping[str, np.ndarray] = field(default_factory=dict)  # name → (iterations,)
    position_metrics: Mapping[str, np.ndarray] = field(default_factory=dict)  # name → (batch, seq, iterations)
    forward_metrics: Mapping[str, float] = field(default_factory=dict)
    expert_load: np.ndarray | None = None  # (iterations, n_experts) tokens routed per expert
    position_iterations: np.ndarray | None = None  # (batch, seq) iterations used by each position
    token_ids: np.ndarray | None = None  # (batch, seq)
    token_text: tuple[tuple[str, ...], ...] | None = None  # (batch, seq) where a tokenizer is known
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)  # request id, endpoint, user…
    schema_version: int = SCHEMA_VERSION
    # which loop of the model: one trace per loop per forward, so nested loops (HRM's high and
    # low cycles) share the forward's trace_id and differ in span_id and loop_name
    loop_name: str = "loop"
    kind: str = "served"  # one of FORWARD_KINDS
    # where it ran: the torch.distributed rank family; the defaults describe a single process
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    host: str = ""
    pid: int = 0
    job_id: str = ""
    # per-request loop budgets (`LoopBudget`, one per batch row), when the forward ran with them:
    # each row's max and min loops, exit threshold (NaN: the policy's default) and why it got that
    # budget (a profile, a governor lowering it); None when the forward ran one n_loops for all
    row_max_loops: np.ndarray | None = None  # (batch,)
    row_min_loops: np.ndarray | None = None  # (batch,)
    row_exit_threshold: np.ndarray | None = None  # (batch,)
    row_budget_reason: tuple[str, ...] | None = None  # (batch,)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name, check in FIELD_CHECKS.items():
            value = getattr(self, name)
            checked = check(name, value)
            if checked is not value:  # a numpy integer made int, a mapping made a dict
                set_(self, name, checked)
        if self.end_ns < self.start_ns:
            raise InvalidRecord(f"end_ns = {self.end_ns} is before start_ns = {self.start_ns}")
        if self.iterations > self.n_loops:
            raise InvalidRecord(f"iterations = {self.iterations} is more than n_loops = {self.n_loops} (the loops requested)")
        if not self.rank < self.world_size or not self.local_rank < self.world_size:
            raise InvalidRecord(
                f"rank {self.rank} and local_rank {self.local_rank} must lie in [0, world_size={self.world_size})"
            )
        it = {}
        for name, values in self.iteration_metrics.items():
            if name not in ITERATION_METRIC_NAMES:
                raise ValueError(f"unknown iteration metric {name!r}; declare it in records.ITERATION_METRICS")
            arr = _frozen_array(values, np.float64)
            if arr.shape != (self.iterations,):
                raise ValueError(f"iteration metric {name!r} has shape {arr.shape}, expected ({self.iterations},)")
            it[name] = arr
        set_(self, "iteration_metrics", it)
        pos = {}
        for name, values in self.position_metrics.items():
            if name not in POSITION_METRIC_NAMES:
                raise ValueError(f"unknown position metric {name!r}; declare it in records.POSITION_METRICS")
            arr = _frozen_array(values, np.float32)
            if arr.shape != (self.batch, self.seq_len, self.iterations):
                raise ValueError(
                    f"position metric {name!r} has shape {arr.shape}, "
                    f"expected ({self.batch}, {self.seq_len}, {self.iterations})"
                )
            pos[name] = arr
        set_(self, "position_metrics", pos)
        fwd = {}
        for name, value in self.forward_metrics.items():
            if name not in FORWARD_METRIC_NAMES:
                raise ValueError(f"unknown forward metric {name!r}; declare it in records.FORWARD_METRICS")
            fwd[name] = float(value)
        set_(self, "forward_metrics", fwd)
        if self.expert_load is not None:
            load = _frozen_array(self.expert_load, np.int64)
            if load.ndim != 2 or load.shape[0] != self.iterations:
                raise ValueError(f"expert_load has shape {load.shape}, expected ({self.iterations}, n_experts)")
            set_(self, "expert_load", load)
        for name in ("position_iterations", "token_ids"):
            value = getattr(self, name)
            if value is not None:
                arr = _frozen_array(value, np.int64)
                if arr.shape != (self.batch, self.seq_len):
                    raise ValueError(f"{name} has shape {arr.shape}, expected ({self.batch}, {self.seq_len})")
                set_(self, name, arr)
        if self.token_text is not None:
            if isinstance(self.token_text, str) or any(isinstance(row, str) for row in self.token_text):
                raise InvalidRecord("token_text must be rows (batch) of token strings (seq_len), not strings")
            text = tuple(tuple(row) for row in self.token_text)
            if len(text) != self.batch or any(len(row) != self.seq_len for row in text):
                raise InvalidRecord(
                    f"token_text has {len(text)} rows of lengths {sorted({len(row) for row in text})}, "
                    f"expected ({self.batch}, {self.seq_len})"
                )
            if not all(type(t) is str for row in text for t in row):
                raise InvalidRecord("token_text must hold strings (the text of each token)")
            set_(self, "token_text", text)
        for name, dtype in (("row_max_loops", np.int64), ("row_min_loops", np.int64),
                            ("row_exit_threshold", np.float64)):
            value = getattr(self, name)
            if value is not None:
                arr = _frozen_array([math.nan if v is None else v for v in value], dtype)
                if arr.shape != (self.batch,):
                    raise InvalidRecord(f"{name} has shape {arr.shape}, expected ({self.batch},)")
                set_(self, name, arr)
        if self.row_budget_reason is not None:
            reasons = tuple(str(r) for r in self.row_budget_reason)
            if len(reasons) != self.batch:
                raise InvalidRecord(f"row_budget_reason has {len(reasons)} entries, expected {self.batch}")
            set_(self, "row_budget_reason", reasons)

    @property
    def n_experts(self) -> int:
        return 0 if self.expert_load is None else int(self.expert_load.shape[1])

    @property
    def row_exit_depths(self) -> np.ndarray | None:
        """(batch,) iterations the deepest position of each row used (None without
        `position_iterations`)."""
        return None if self.position_iterations is None else self.position_iterations.max(axis=1)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists instead of arrays, NaN as None); `from_dict` inverts it."""

        def plain(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return plain(v.tolist())
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else v
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, Mapping):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoopTrace":
        def arr(v: Any) -> Any:
            return None if v is None else np.array(v, dtype=np.float64)

        kwargs = dict(data)
        kwargs["iteration_metrics"] = {k: arr(v) for k, v in data.get("iteration_metrics", {}).items()}
        kwargs["position_metrics"] = {k: arr(v) for k, v in data.get("position_metrics", {}).items()}
        kwargs["forward_metrics"] = {
            k: (math.nan if v is None else v) for k, v in data.get("forward_metrics", {}).items()
        }
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
