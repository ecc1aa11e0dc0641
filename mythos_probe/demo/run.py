"""`mythos-probe demo`: the main job. Loads the shipped trained looped model, runs a workload of
mixed difficulty (modular arithmetic chains of k steps) with probes at the positions level,
stores every forward in the embedded DuckDB store, together with the run the probes recorded
while the model trained, and serves the dashboard on it.

A second run appends to the same store (a new run id); a file that is not a mythos-probe store
is refused with a message, never overwritten. Each request runs as served (ACT) and once more at
full depth (`exit="fixed"`, stored with `kind="shadow"`): the baseline of the early-exit what-if.
The summary prints accuracy and iterations used by difficulty, the what-if's recommendation at
≥ 99 % agreement with full depth (the same sentence the dashboard shows, `whatif.describe`), and
the best policy the model can run (`kl` or `latent`) and the served one (`act`) run for real
(`whatif.verify`): measured time, FLOPs and agreement next to the prediction.

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
    parser.add_argument("--no-serve", action="store_true", help="print a summary and exit instead of serving")
    parser.add_argument("--host", default="127.0.0.1", help="dashboard interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8050, help="dashboard port (default: 8050; 0 picks a free one)")


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.batch < 1:
        print("mythos-probe demo: --requests and --batch must be at least 1", file=sys.stderr)
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
        print(measured_saving(shadows, args.batch, args.seed))
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
                "endpoint": "/easy" if k <= 3 else "/medium" if k <= train_steps else "/hard",
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


def measured_saving(shadows, batch: int, seed: int) -> str:
    """The best policy the model runs with a threshold (`kl`, `latent`), recommended by the
    what-if on the shadow forwards, and the served policy (`act`), each run for real on a held-out
    batch of the longest trained chains beside a full-depth run of it."""
    from mythos_probe import whatif
    from mythos_probe.demo.tasks import ChainTask
    from mythos_probe.demo.checkpoint import load_metadata, load_trained_model

    model, _ = load_trained_model()
    steps = int(load_metadata()["settings"]["train_steps"])
    inputs = ChainTask(seed=2000 + seed).batch(batch, steps).input_ids
    n_loops, described = 2 * model.cfg.max_loop_iters, f"{batch} chains of {steps} steps"
    runnable = {c: p for p, c in whatif.POLICY_CRITERIA.items() if p != "act"}  # act: the served policy
    table = whatif.evaluate(shadows)
    try:
        best = whatif.recommend(table[table["criterion"].isin(runnable)], MIN_AGREEMENT)
    except ValueError as exc:
        lines = [f"not run for real: no policy the model runs is recommended at ≥99% agreement: {exc}"]
    else:
        r = whatif.verify(model, inputs, runnable[best["criterion"]], float(best["threshold"]), n_loops=n_loops)
        lines = [describe_measured(r, described)]
    served = whatif.verify(model, inputs, "act", n_loops=n_loops)
    lines.append("the served policy, " + describe_measured(served, described))
    return "\n".join(lines)


def describe_measured(r, inputs: str) -> str:
    """One line for a `whatif.verify` report; a second when the time saved falls well short of the
    FLOPs saved (what it means and what to do), and another when the executed FLOPs save well
    below the replay's prediction (why)."""
    line = (
        f"run for real (exit={r['policy']!r}, threshold {r['threshold']:.3g}, {inputs}, "
        f"against exit='fixed'): saved {r['time_saved']:.1%} of the time, {r['flops_saved']:.1%} of the executed "
        f"FLOPs and {r['iterations_saved']:.1%} of loop iterations, agreement {r['agreement']:.1%} "
        f"(predicted: {r['predicted_flops_saved']:.1%} of FLOPs, {r['predicted_iterations_saved']:.1%} of iterations, "
        f"agreement {r['predicted_agreement']:.1%})"
    )
    why = ("each iteration has a fixed cost (exit test, host read, many small operators) that a small batch on a "
           "small model does not win back, and a batch runs until its slowest position exits; larger batches or "
           "wider models save in proportion (benchmarks/bench_early_exit.py)")
    if r["time_saved"] <= 0:
        line += f"\n  NOT faster than exit='fixed' here: for batches like this one, keep exit='fixed' rather than " \
                f"this policy. The FLOPs saved did not turn into time: {why}."
    elif r["time_saved"] < 0.5 * r["flops_saved"]:
        line += f"\n  The time saved is well below the FLOPs saved at this batch size: {why}."
    if r["predicted_flops_saved"] - r["flops_saved"] >= 0.05:
        halted = (", and under ACT halted positions keep updating while their row still has a running position"
                  if r["policy"] == "act" else "")
        line += ("\n  The executed FLOPs save less than predicted: the replay counts the iterations of the positions "
                 "still running only, while the model also computes the keys and values of exited positions, and "
                 "every position of an iteration in which too many still run for skipping them to pay "
                 f"(RecurrentBlock.compact_share){halted}.")
    return line


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
