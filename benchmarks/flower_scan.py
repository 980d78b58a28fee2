"""What Flower 1.42's simulation engine spends on finding messages, by federation size.

Why this exists: ``fedpeft bench --only scale`` finds that the ServerApp's own CPU per round does
not grow from 10 to 10,000 virtual clients, but the round's wall time and the process tree's
CPU do. The cause is in Flower's simulation engine, not in fedpeft: its extractor thread
(``flwr/server/superlink/fleet/vce/vce_api.py``, ``add_messages_to_queue``) asks the LinkState
for every registered node in turn, every 0.1 s, whether a message waits for it
(``InMemoryLinkState.get_message_ins(node_id, limit=1)``), and each ask walks every stored
message (``in_memory_linkstate.py``), so one scan costs O(nodes x messages in flight) CPU,
all the time a round is in flight, on the cores the clients train on.

This measures one scan with Flower's own ``get_message_ins`` and ``_check_stored_messages``
bound to a minimal state (the stored messages' metadata, the run's federation, a lock), so no
SuperLink, Ray or model is involved: CPU milliseconds per scan for each (nodes, messages in
flight), the median of ``reps`` scans. Run: ``python -m benchmarks.flower_scan`` (writes
``benchmarks/results/flower_scan.{json,md}``); it takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

RESULT = Path(__file__).resolve().parent / "results" / "flower_scan"


class _State:
    """The parts of Flower's in-memory LinkState that ``get_message_ins`` reads, with ``messages``
    messages in flight to nodes that are not scanned (as in a round: 10 of N nodes have one)."""

    def __init__(self, messages: int) -> None:
        from flwr.common import now
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

        self.get_message_ins = InMemoryLinkState.get_message_ins.__get__(self)
        self._check_stored_messages = InMemoryLinkState._check_stored_messages.__get__(self)
        self.lock = threading.RLock()
        created = now().timestamp()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=-1 - i, src_node_id=0, run_id=1,
                                                              created_at=created, ttl=3600.0, delivered_at=""))
            for i in range(messages)}
        self.run_ids = {1: SimpleNamespace(run=SimpleNamespace(federation_id="@none/default"))}
        self.federation_manager = SimpleNamespace(filter_nodes=lambda nodes, federation: nodes)

    def delete_messages(self, message_ids: set[str]) -> None:  # nothing expires in a scan this short
        del message_ids


def scan_ms(nodes: int, messages: int, reps: int = 5) -> float:
    """Median CPU milliseconds of one extractor scan over ``nodes`` nodes with ``messages`` in flight."""
    state = _State(messages)
    times = []
    for _ in range(reps):
        t = time.process_time()
        for node_id in range(nodes):
            state.get_message_ins(node_id=node_id, limit=1)
        times.append(1000 * (time.process_time() - t))
    return statistics.median(times)


def measure(sizes: tuple[int, ...] = (10, 1000, 10000), in_flight: tuple[int, ...] = (0, 10),
            reps: int = 5) -> list[dict[str, Any]]:
    """One row per (nodes, messages in flight): CPU ms per scan and the share of one core the
    extractor then takes (a scan, then Flower's 0.1 s wait)."""
    rows = []
    for n in sizes:
        for m in in_flight:
            ms = scan_ms(n, m, reps)
            rows.append({"nodes": n, "messages_in_flight": m, "cpu_ms_per_scan": round(ms, 3),
                         "core_share": round(ms / (ms + 100.0), 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    import datetime as dt
    import os
    import platform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULT, help="path without suffix (.json and .md written)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = measure(reps=args.reps)
    when = dt.datetime.now(dt.UTC)
    import flwr

    head = (f"Flower {flwr.__version__} simulation engine, one extractor scan (module doc of "
            f"benchmarks/flower_scan.py), {when:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"median of {args.reps} scans.")
    md = [head, "", "| nodes | messages in flight | CPU ms per scan | share of one core (scan + 0.1 s wait) |",
          "|---|---|---|---|"]
    md += [f"| {r['nodes']:,} | {r['messages_in_flight']} | {r['cpu_ms_per_scan']:.2f} | {r['core_share']:.0%} |"
           for r in rows]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(
        {"date": f"{when:%Y-%m-%d}", "time_utc": f"{when:%H:%M:%S}", "cores": os.cpu_count(),
         "load_average": {"before": load_before, "after": os.getloadavg()}, "flwr": flwr.__version__,
         "rows": rows}, indent=1) + "\n", encoding="utf-8")
    args.output.with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
