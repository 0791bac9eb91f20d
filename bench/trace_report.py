"""Summarises a continuous engine's --bench-trace-path timeline: where requests spend their time, what steps do.

    python bench/trace_report.py trace.jsonl [--skip-s 5]

Per request priority (FINAL, NORMAL, INTERIM): p50/p90/p99 ms of arrival -> features ready ("prepare"), features
ready -> prefill start ("admit"), prefill start -> first token ("prefill"), first token -> end ("decode"), and the
whole. Per step: how many, busy share of the wall time, ms per phase on the host (plan, prefill, decode launch,
collect: the wait for the previous step's tokens), rows decoding and prefills per step. Prompt tokens prefilled per
request (the rest reused from the stream cache's KV prefixes) and the share of draft tokens a final's prefill kept.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np


def _pcts(values: list[float]) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    return f"{np.percentile(a, 50):7.1f} {np.percentile(a, 90):7.1f} {np.percentile(a, 99):7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--skip-s", type=float, default=0.0, help="ignore the first seconds (warm-up)")
    parser.add_argument(
        "--by-s", type=float, default=0.0, help="also per window of this many seconds of arrivals (start-up lag)"
    )
    args = parser.parse_args()
    reqs: list[dict[str, float]] = []
    steps: list[dict[str, float]] = []
    collections: list[dict[str, float]] = []
    with open(args.trace, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            {"req": reqs, "step": steps, "gc": collections}.get(row["k"], []).append(row)
    if reqs:
        first_ns = min(r["enq"] for r in reqs)
        reqs = [r for r in reqs if r["enq"] - first_ns >= args.skip_s * 1e9]
    by_priority: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in reqs:
        by_priority[str(r["priority"])].append(r)
    print("requests: phase p50 p90 p99 (ms)")
    for priority, rows in sorted(by_priority.items()):
        print(
            f"  {priority}: {len(rows)} requests, audio {np.mean([r['audio_s'] for r in rows]):.1f} s mean, "
            f"{np.mean([r['tokens'] for r in rows]):.0f} tokens, prompt {np.mean([r['prompt'] for r in rows]):.0f}"
        )
        phases = {
            "prepare": [(r["prepared"] - r["enq"]) / 1e6 for r in rows if r["prepared"]],
            "admit": [(r["start"] - max(r["prepared"], r["enq"])) / 1e6 for r in rows if r["start"]],
            "prefill": [(r["first"] - r["start"]) / 1e6 for r in rows if r["first"] and r["start"]],
            "decode": [(r["end"] - r["first"]) / 1e6 for r in rows if r["first"]],
            "total": [(r["end"] - r["enq"]) / 1e6 for r in rows],
        }
        for name, values in phases.items():
            print(f"    {name:8s} {_pcts(values)}")
        prefilled = [r["prefilled"] for r in rows if r.get("prefilled", -1) >= 0]
        if prefilled:
            print(f"    prompt tokens prefilled (the rest reused) p50/p90/p99 {_pcts(prefilled)}")
        drafted = [r for r in rows if r.get("draft")]
        if drafted:
            accepted = sum(r["draft_accepted"] for r in drafted) / sum(r["draft"] for r in drafted)
            print(
                f"    drafts: {len(drafted)} requests, {np.mean([r['draft'] for r in drafted]):.0f} tokens mean, "
                f"{accepted:.0%} of draft tokens accepted"
            )
    if reqs and args.by_s > 0:
        _by_window(reqs, args.by_s)
    if steps:
        if args.skip_s:
            t0 = min(s["t"] for s in steps)
            steps = [s for s in steps if s["t"] - t0 >= args.skip_s * 1e9]
        wall_s = (steps[-1]["t"] - steps[0]["t"]) / 1e9 if len(steps) > 1 else 0.0
        busy_ms = sum(s["plan_ms"] + s["prefill_ms"] + s["launch_ms"] + s["collect_ms"] for s in steps)
        print(
            f"steps: {len(steps)} over {wall_s:.1f} s ({len(steps) / max(wall_s, 1e-9):.0f}/s), "
            f"in step() {busy_ms / 1000 / max(wall_s, 1e-9):.0%} of the wall time"
        )
        for name in ("plan_ms", "prefill_ms", "launch_ms", "collect_ms"):
            values = [s[name] for s in steps]
            print(f"  {name:11s} p50/p90/p99 {_pcts(values)}  sum {sum(values) / 1000:.2f} s")
        with_prefill = [s for s in steps if s["prefills"]]
        print(
            f"  steps with a prefill: {len(with_prefill)}, prefills per such step "
            f"{np.mean([s['prefills'] for s in with_prefill]) if with_prefill else 0:.1f}, "
            f"tokens {np.mean([s['prefill_tokens'] for s in with_prefill]) if with_prefill else 0:.0f}; "
            f"prefill_ms there {_pcts([s['prefill_ms'] for s in with_prefill])}"
        )
        print(
            f"  rows decoding p50 {np.median([s['rows'] for s in steps]):.0f}, max {max(s['rows'] for s in steps)}; "
            f"waiting p50 {np.median([s['waiting'] for s in steps]):.0f}, max {max(s['waiting'] for s in steps)}"
        )
        gaps = [
            (b["t"] - a["t"]) / 1e6 - (a["plan_ms"] + a["prefill_ms"] + a["launch_ms"] + a["collect_ms"])
            for a, b in zip(steps, steps[1:], strict=False)
        ]
        print(f"  between steps (host outside step()) ms p50/p90/p99 {_pcts(gaps)}  sum {sum(gaps) / 1000:.2f} s")
    if collections:
        _gc_report(collections, min((s["t"] for s in steps), default=collections[0]["t"]))


def _gc_report(collections: list[dict[str, float]], t0_ns: float) -> None:
    """The engine process's full (and >= 5 ms) garbage collections: how many, how long, the longest and when."""
    full = [c for c in collections if c["gen"] == 2]
    print(
        f"gc: {len(full)} full collections, ms p50/p90/p99 {_pcts([c['ms'] for c in full])}; "
        f"{len(collections) - len(full)} younger ones >= 5 ms"
    )
    for c in sorted(collections, key=lambda c: -c["ms"])[:10]:
        print(f"  at {(c['t'] - t0_ns) / 1e9:7.1f} s: gen {c['gen']:.0f}, {c['ms']:.1f} ms, {c['collected']} collected")


def _by_window(reqs: list[dict[str, float]], window_s: float) -> None:
    """Per window of arrivals: requests, and each priority's total and prefill p50/max (ms)."""
    first_ns = min(r["enq"] for r in reqs)
    windows: dict[int, list[dict[str, float]]] = defaultdict(list)
    for r in reqs:
        windows[int((r["enq"] - first_ns) / 1e9 // window_s)].append(r)
    print(f"by {window_s:g} s of arrivals: priority n total p50/max, prefill p50/max (ms)")
    for index, rows in sorted(windows.items()):
        parts = []
        for priority in sorted({str(r["priority"]) for r in rows}):
            mine = [r for r in rows if str(r["priority"]) == priority]
            total = [(r["end"] - r["enq"]) / 1e6 for r in mine]
            prefill = [(r["first"] - r["start"]) / 1e6 for r in mine if r["first"] and r["start"]] or [0.0]
            parts.append(
                f"{priority} {len(mine)} {np.median(total):.0f}/{max(total):.0f}, "
                f"{np.median(prefill):.0f}/{max(prefill):.0f}"
            )
        print(f"  {index * window_s:6.0f}s  " + "; ".join(parts))


if __name__ == "__main__":
    main()
