"""`mythos-probe demo`: the main job. Loads the shipped trained looped model, runs a workload of
mixed difficulty (modular arithmetic chains of k steps) with probes at the positions level,
stores every forward in the embedded DuckDB store, together with the run the probes recorded
while the model trained, and serves the dashboard on it.

A second run appends to the same store (a new run id); a file that is not a mythos-probe store
is refused with a message, never overwritten. `--no-serve` prints a summary instead: accuracy and
iterations used by difficulty, and the compute the best early-exit policy would save at ≥ 99 %
agreement with the full-depth answer.

This module is not: the model, the probes or the dashboard; it only wires them together.
"""

from __future__ import annotations

import argparse
import sys
import time

HELP = "run the trained model on a mixed workload, store it and serve the dashboard"
DEFAULT_STORE = "mythos-probe-demo.duckdb"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"DuckDB store to write (default: ./{DEFAULT_STORE})")
    parser.add_argument("--requests", type=int, default=48, help="requests in the workload (default: 48)")
    parser.add_argument("--batch", type=int, default=16, help="examples per request (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument("--no-serve", action="store_true", help="print a summary and exit instead of serving")
    parser.add_argument("--host", default="127.0.0.1", help="dashboard interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8050, help="dashboard port (default: 8050)")


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.batch < 1:
        print("mythos-probe demo: --requests and --batch must be at least 1", file=sys.stderr)
        return 2
    from mythos_probe.collectors.store import SchemaError, Store, StoreError

    try:
        store = Store(args.store)  # opened first: a foreign or corrupt file stops us before any work
    except (StoreError, SchemaError) as exc:
        print(f"mythos-probe demo: {exc}\nChoose another file with --store PATH.", file=sys.stderr)
        return 2
    try:
        from mythos_probe.trained import load_training_traces

        traces, shadows, outcomes = record_workload(args.requests, args.batch, args.seed)
        training = load_training_traces()  # same ids every run: stored once (the store dedupes)
        store.write_traces(training + traces + shadows)
        print(summary(traces, shadows, outcomes))
        print(f"stored {len(traces)} served and {len(shadows)} full-depth forwards, and {len(training)} "
              f"recorded training steps, in {args.store}")
        if args.no_serve:
            return 0
        return serve(store, args.host, args.port)
    finally:
        store.close()


def record_workload(requests: int, batch: int, seed: int):
    """Run the workload with probes attached. Returns (served traces, full-depth shadow traces,
    (k, accuracy) per request): each request runs with ACT, as served, and once more at full
    depth (`exit="fixed"`), the baseline an early-exit policy must agree with."""
    import torch
    from tqdm import tqdm

    import mythos_probe
    from mythos_probe.collector import DEFAULT_PROBES
    from mythos_probe.tasks import ChainTask, decode
    from mythos_probe.trained import load_metadata, load_trained_model

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
            shadows.append(shadow)
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
        best = whatif.recommend(table, min_agreement=0.99)
        lines.append(
            f"best early-exit policy at ≥99% agreement: {best['criterion']} (threshold {best['threshold']:g}) "
            f"saves {best['iterations_saved']:.1%} of loop iterations at {best['agreement']:.1%} agreement"
        )
    except ValueError as exc:
        lines.append(f"no early-exit policy reaches 99% agreement: {exc}")
    return "\n".join(lines)


def serve(store, host: str, port: int) -> int:
    from werkzeug.serving import make_server

    from mythos_probe.dashboards.app import create_app

    try:
        server = make_server(host, port, create_app(store).server, threaded=True)
    except OSError as exc:
        print(f"mythos-probe demo: cannot listen on {host}:{port} ({exc}); try --port", file=sys.stderr)
        return 2
    print(f"dashboard: http://{host}:{server.server_port}/  (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
