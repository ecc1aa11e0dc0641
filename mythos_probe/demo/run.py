"""`mythos-probe demo`: the main job. Loads the shipped trained looped model, runs a workload of
mixed difficulty (modular arithmetic chains of k steps) with probes at the positions level,
stores every forward in the embedded DuckDB store, together with the run the probes recorded
while the model trained, and serves the dashboard on it.

A second run appends to the same store (a new run id); a file that is not a mythos-probe store
is refused with a message, never overwritten. Each request runs as served (ACT) and once more at
full depth (`exit="fixed"`, stored with `kind="shadow"`): the baseline of the early-exit what-if.
Requests go to three endpoints by chain length (`ENDPOINT_LENGTHS`). The summary prints accuracy
and iterations used by difficulty, the what-if's recommendation at ≥ 99 % agreement with full
depth over the whole workload (the same sentence the dashboard shows, `whatif.describe`), then a
loop profile per endpoint chosen on the stored shadows (`loop_profiles.profiles`), each run for
real on held-out requests of its endpoint beside full depth, timed interleaved over `--rounds`
rounds and printed as a range, with the measured agreement beside the what-if's and a verdict:
a profile is recommended only when every round was faster than full depth. The profile's
predicted FLOPs and agreement are printed once, from the same replay that chose it.

This module is not: the model, the probes or the dashboard; it only wires them together.
"""

from __future__ import annotations

import argparse
import sys
import time

from mythos_probe.cli import port_number

HELP = "run the trained model on a mixed workload, store it and serve the dashboard"
DEFAULT_STORE = "mythos-probe-demo.duckdb"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"DuckDB store to write (default: ./{DEFAULT_STORE})")
    parser.add_argument("--requests", type=int, default=48, help="requests in the workload (default: 48)")
    parser.add_argument("--batch", type=int, default=16, help="examples per request (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds per endpoint profile run for real (default: 5)")
    parser.add_argument("--no-serve", action="store_true", help="print a summary and exit instead of serving")
    parser.add_argument("--host", default="127.0.0.1", help="dashboard interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8050, help="dashboard port (default: 8050; 0 picks a free one)")


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.batch < 1 or args.rounds < 1:
        print("mythos-probe demo: --requests, --batch and --rounds must be at least 1", file=sys.stderr)
        return 2
    from mythos_probe.collectors.serve import bind
    from mythos_probe.collectors.store import SchemaError, Store, StoreError

    # The port and the store first: a port in use or a foreign or corrupt file stops us before any work.
    sock = None if args.no_serve else bind(args.host, args.port)
    try:
        store = Store(args.store)
    except (StoreError, SchemaError) as exc:
        if sock is not None:
            sock.close()
        print(f"mythos-probe demo: {exc}\nChoose another file with --store PATH.", file=sys.stderr)
        return 2
    try:
        from mythos_probe.demo.checkpoint import load_training_traces

        traces, shadows, outcomes = record_workload(args.requests, args.batch, args.seed)
        training = load_training_traces()  # same ids every run: stored once (the store dedupes)
        store.write_traces(training + traces + shadows)
        print(summary(traces, shadows, outcomes))
        print(profile_verdicts(shadows, args.batch, args.seed, args.rounds))
        print(f"stored {len(traces)} served and {len(shadows)} full-depth forwards, and {len(training)} "
              f"recorded training steps, in {args.store}")
        if sock is None:
            return 0
        # Served read-only: a notebook, `mythos-probe dashboard` or `export` may open the file too.
        store.close()
        store = Store.open_read_only(args.store)
        return serve(store, sock)
    finally:
        if sock is not None:
            sock.close()
        store.close()


def record_workload(requests: int, batch: int, seed: int):
    """Run the workload with probes attached. Returns (served traces, full-depth shadow traces,
    (k, accuracy) per request): each request runs with ACT, as served, and once more at full
    depth (`exit="fixed"`, its trace tagged `kind="shadow"`), the baseline an early-exit policy
    must agree with."""
    import dataclasses

    import torch
    from tqdm import tqdm

    import mythos_probe
    from mythos_probe.probes.reductions import DEFAULT_PROBES
    from mythos_probe.demo.tasks import ChainTask, decode
    from mythos_probe.demo.checkpoint import load_metadata, load_trained_model

    model, _ = load_trained_model()
    train_steps = int(load_metadata()["settings"]["train_steps"])
    task = ChainTask(seed=1000 + seed)  # held out from training
    run_id = time.strftime("demo-%Y%m%d-%H%M%S")
    lengths = list(range(1, train_steps + 3))  # chain lengths seen in training, and two beyond
    users = ["ana", "bo", "chen", "dia"]
    traces, shadows, outcomes = [], [], []
    with torch.no_grad():
        for i in tqdm(range(requests), desc="demo workload", unit="request", file=sys.stderr):
            k = lengths[i % len(lengths)]
            b = task.batch(batch, k)
            attributes = {
                "endpoint": endpoint_of(k),
                "user": users[i % len(users)],
                "request_id": f"req-{seed}-{i:04d}",
                "chain_steps": k,
            }
            with mythos_probe.attach(model, probes=[*DEFAULT_PROBES, "lens"], detail="positions",
                                     attributes=attributes, run_id=run_id, model_id="chains",
                                     token_text=lambda t: decode([t])) as rec:
                logits = model(b.input_ids, n_loops=2 * model.cfg.max_loop_iters)  # ACT decides the depth
                # a shadow run at full depth: the baseline the early-exit what-if compares against
                model(b.input_ids, n_loops=2 * model.cfg.max_loop_iters, exit="fixed")
            served, shadow = rec.traces
            traces.append(served)
            shadows.append(dataclasses.replace(shadow, kind="shadow"))
            outcomes.append((k, (logits[:, -1].argmax(-1) == b.answers).float().mean().item()))
    return traces, shadows, outcomes


def summary(traces, shadows, outcomes) -> str:
    import numpy as np

    from mythos_probe import whatif

    lines = ["chain steps  requests  accuracy  iterations used (answer)  iterations run"]
    by_k: dict[int, list] = {}
    for trace, (k, acc) in zip(traces, outcomes):
        by_k.setdefault(k, []).append((trace, acc))
    for k in sorted(by_k):
        rows = by_k[k]
        used = np.mean([t.position_iterations[:, -1].mean() for t, _ in rows])
        run = np.mean([t.iterations for t, _ in rows])
        acc = np.mean([a for _, a in rows])
        lines.append(f"{k:>11}  {len(rows):>8}  {acc:>8.1%}  {used:>24.2f}  {run:>14.2f}")
    table = whatif.evaluate(shadows)
    try:
        lines.append(f"what-if at ≥99% agreement: {whatif.describe(whatif.recommend(table, MIN_AGREEMENT))}")
    except ValueError as exc:
        lines.append(f"what-if at ≥99% agreement: no early-exit policy recommended: {exc}")  # too few agree, or none saves
    return "\n".join(lines)


MIN_AGREEMENT = 0.99


# The profiles' bound: one-sided 90 %, so that the default workload (48 requests of 16, the answer
# position replayed) gives each endpoint enough positions to leave full depth at 99 % agreement.
CONFIDENCE = 0.9
ENDPOINT_LENGTHS = {"/easy": range(1, 4), "/medium": range(4, 7), "/hard": range(7, 11)}  # chain steps


def endpoint_of(k: int) -> str:
    return next(e for e, lengths in ENDPOINT_LENGTHS.items() if k in lengths or e == "/hard")


def profile_verdicts(shadows, batch: int, seed: int, rounds: int = 5) -> str:
    """Profiles per endpoint chosen on the stored workload's shadow forwards, each run for real on
    held-out requests of its endpoint beside full depth (`measure`), with a verdict: recommended
    only when every timed round was faster than full depth."""
    from mythos_probe import loop_profiles
    from mythos_probe.demo.checkpoint import load_trained_model

    chosen = loop_profiles.profiles(shadows, target=MIN_AGREEMENT, by="endpoint", confidence=CONFIDENCE)
    model, _ = load_trained_model()
    lines = [f"loop profiles per endpoint from {len(shadows)} full-depth shadow forwards (agreement ≥ "
             f"{MIN_AGREEMENT:.0%} as a {CONFIDENCE:.0%} lower bound on the answer position; what-if prediction):"]
    for endpoint, profile in sorted(chosen.profiles.items(), key=lambda kv: list(ENDPOINT_LENGTHS).index(kv[0])
                                    if kv[0] in ENDPOINT_LENGTHS else 99):
        lines.append("  " + profile.describe())
        if profile.keeps_full_depth:
            lines.append(f"    verdict {endpoint}: keep full depth (exit='fixed', {profile.max_loops} loops)")
            continue
        m = measure(model, profile, ENDPOINT_LENGTHS.get(endpoint, range(1, 2)), batch, seed, rounds)
        lines += ["    " + line for line in describe_measurement(endpoint, profile, m)]
    return "\n".join(lines)


def measure(model, profile, lengths, batch: int, seed: int, rounds: int) -> dict:
    """Run `profile` for real on held-out batches (one per chain length, generator seed ≠ the
    workload's) beside full depth, interleaved: each round times every batch under the profile
    and at full depth, alternating; per round the time saved is 1 − Σ profile / Σ full depth.
    Agreement: the answer (last position, the one the replay reads) equal to full depth's."""
    import torch

    from mythos_probe.demo.tasks import ChainTask

    task = ChainTask(seed=3000 + seed)
    inputs = [task.batch(batch, k).input_ids for k in lengths]
    budget = profile.budget()
    full = dict(n_loops=profile.full_depth, exit="fixed")
    agree = total = used = 0
    saved = []
    with torch.inference_mode():
        for ids in inputs:  # untimed: agreement and iterations, and a warm-up
            out = model(ids, exit=profile.policy, budgets=[budget] * ids.shape[0])
            used += model.last_forward["row_iterations"] if profile.policy == "fixed" else 0
            ref = model(ids, **full)
            agree += int((out[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).sum())
            total += ids.shape[0]
        for _ in range(rounds):
            t_profile = t_full = 0.0
            for ids in inputs:
                start = time.perf_counter()
                model(ids, exit=profile.policy, budgets=[budget] * ids.shape[0])
                t_profile += time.perf_counter() - start
                start = time.perf_counter()
                model(ids, **full)
                t_full += time.perf_counter() - start
            saved.append(1.0 - t_profile / t_full)
    return {"agreement": agree / total, "answers": total, "time_saved": (min(saved), max(saved)), "rounds": rounds}


def describe_measurement(endpoint: str, profile, m: dict) -> list[str]:
    """The measured lines of one endpoint: time saved as a range over rounds, agreement beside the
    what-if's, a warning when they differ by more than the bound, and the verdict. A profile whose
    range reaches 0 (some round not faster than full depth) is never recommended."""
    low, high = m["time_saved"]
    bound = profile.agreement - profile.agreement_lower
    lines = [f"run for real on {m['answers']} held-out chains beside full depth, {m['rounds']} interleaved rounds: "
             f"saved {low:.0%} to {high:.0%} of the time (predicted {profile.flops_saved:.1%} of FLOPs); agreement "
             f"measured {m['agreement']:.1%} vs what-if {profile.agreement:.1%} (bound ±{bound:.1%})"]
    if abs(m["agreement"] - profile.agreement) > bound:
        lines.append(f"WARNING: measured and what-if agreement differ by more than the bound: the replay assumes every "
                     f"position follows its full-depth path until it exits; on these requests it did not. Record more "
                     f"shadows for {endpoint} or raise the target")
    if low <= 0:
        lines.append(f"verdict {endpoint}: NOT recommended: some rounds were not faster than full depth; keep exit='fixed'")
    elif m["agreement"] < MIN_AGREEMENT - bound:
        lines.append(f"verdict {endpoint}: NOT recommended: measured agreement below the target less the bound "
                     f"({MIN_AGREEMENT - bound:.1%}); keep exit='fixed'")
    else:
        th = "" if profile.exit_threshold is None else f", threshold {profile.exit_threshold:.3g}"
        lines.append(f"verdict {endpoint}: recommended: exit={profile.policy!r}{th}, max_loops {profile.max_loops}")
    return lines


def serve(store, sock) -> int:
    """The dashboard on `store`, served on the listening socket `sock` until Ctrl+C."""
    from mythos_probe.collectors.serve import wsgi_server
    from mythos_probe.dashboards.app import create_app

    server = wsgi_server(create_app(store).server, sock=sock)
    print(f"dashboard: http://{server.host}:{server.port}/  (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
