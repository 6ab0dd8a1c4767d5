"""One chat user's time to first token, split into the model's part and the rest.

    .venv/bin/python bench/bench_first_token.py [--requests 24] [--max-tokens 32]

Starts llama-server (as bench_vs_llama_server.py builds it) and this service
with ``make run`` defaults, and sends one user's streamed chat requests to each,
the sides taking turns (each side's prompts share their start, as one user's do,
so both reuse the cached prefix). Prints per side the client-side time to first
token, and the model's part of it: llama-server's own ``prompt_ms`` (its
``timings``), ours from the ``model_api_model_time_to_first_token_seconds``
histogram of ``/metrics`` (request queued at the scheduler to first token). The
difference between the two columns is each server's own path around the model.
The first two requests of each side warm up and are not counted.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_llama_server import (  # noqa: E402  (the sibling script's helpers)
    OUT, LlamaServer, Ours, in_turn, llama_cpp_version, llama_server_binary, prompt_for, stream_chat,
)

_TTFT = re.compile(r"model_api_model_time_to_first_token_seconds_(sum|count)\{[^}]*\} (\S+)")


def engine_ttft_total(url: str) -> tuple[float, float]:
    """(sum of seconds, count) of our engine's time-to-first-token histogram."""
    found = dict(_TTFT.findall(requests.get(url + "/metrics", timeout=10).text))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=24, help="per side, two of them warm-up")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    from model_api.engine.local import default_model_path

    binary = llama_server_binary(llama_cpp_version())
    with LlamaServer(binary, default_model_path(), os.cpu_count() or 2) as ls, Ours("first-token") as ours:
        sides = [("llama-server", ls.url, None), ("ours", ours.url, ours.key)]
        sessions = {name: requests.Session() for name, _, _ in sides}
        client: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        model: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        for j in range(args.requests):
            for name, url, key in in_turn(sides, j):
                before = engine_ttft_total(ours.url) if name == "ours" else None
                r = stream_chat(sessions[name], url, key, prompt_for("chat", 0, j, f"first-{name[0]}"),
                                args.max_tokens)
                if j < 2:
                    continue
                client[name].append(r["ttft"] * 1000)
                if before is not None:
                    total, count = engine_ttft_total(ours.url)
                    if count == before[1] + 1:
                        model[name].append((total - before[0]) * 1000)
                elif "prompt_ms" in r["timings"]:
                    model[name].append(r["timings"]["prompt_ms"])
    print(f"one user, {args.requests - 2} requests a side, p50 ms")
    print(f"{'side':14} {'client TTFT':>12} {'model part':>11} {'the rest':>9}")
    for name in client:
        c = statistics.median(client[name])
        m = statistics.median(model[name]) if model[name] else float("nan")
        print(f"{name:14} {c:12.1f} {m:11.1f} {c - m:9.1f}")


if __name__ == "__main__":
    main()
