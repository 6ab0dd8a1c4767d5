"""A streaming chat's inter-token gaps while other users send long prompts:
llama-server against this service, side by side and interleaved.

    .venv/bin/python bench/bench_stream_gaps.py [--arm NAME:ENV=VALUE,...] [--heavy 4] [--rounds 2]

Each side serves ``--heavy`` users who send ~1,000-token prompts (the
prompt-heavy workload of bench_vs_llama_server.py) back to back; meanwhile one
more user streams a 64-token chat reply, and the gaps between its tokens are
recorded. Every arm is this service with ``make run`` defaults plus its
environment (``--arm default --arm chunk128:MODEL_PREFILL_CHUNK=128`` compares
prompt chunk sizes). Prints p50 / p90 / p99 / max per side: what a server's
way of reading long prompts costs the streams already running.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import requests
from bench_vs_llama_server import (CHAT_PROMPT, LlamaServer, Ours, arm, llama_cpp_version, llama_server_binary,
                                   load, pct, prompt_for, stream_chat)

from model_api.engine.local import default_model_path

STREAM_TOKENS = 64


def stream_gaps(url: str, key: str | None, salt: str) -> list[float]:
    """One streamed chat reply: seconds between consecutive content events."""
    times: list[float] = []
    stream_chat(requests.Session(), url, key, f"{CHAT_PROMPT} ({salt})", STREAM_TOKENS, token_times=times)
    return [b - a for a, b in zip(times, times[1:])]


def long_prompts(url: str, key: str | None, user: int, salt: str, stop: threading.Event) -> None:
    session, j = requests.Session(), 0
    while not stop.is_set():
        stream_chat(session, url, key, prompt_for("prompt", user, j, salt), 16)
        j += 1


def under_load(url: str, key: str | None, heavy: int, salt: str) -> list[float]:
    stop = threading.Event()
    users = [threading.Thread(target=long_prompts, args=(url, key, i, salt, stop)) for i in range(heavy)]
    for t in users:
        t.start()
    time.sleep(3)  # the long prompts are being read
    try:
        return stream_gaps(url, key, salt)
    finally:
        stop.set()
        for t in users:
            t.join()


def summary(gaps: list[float]) -> str:
    ms = [pct(gaps, q) * 1000 for q in (50, 90, 99, 100)]
    return f"p50 {ms[0]:6.0f} ms  p90 {ms[1]:6.0f}  p99 {ms[2]:6.0f}  max {ms[3]:6.0f} ms  ({len(gaps)} gaps)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="append", type=arm, help="NAME[:ENV=VALUE,...] (default: one arm, `ours`)")
    ap.add_argument("--heavy", type=int, default=4, help="users sending long prompts meanwhile")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    binary = llama_server_binary(llama_cpp_version())
    with contextlib.ExitStack() as stack:
        sides = [("llama-server", stack.enter_context(LlamaServer(binary, default_model_path(), 2)).url, None)]
        for name, env in args.arm or [("ours", {})]:
            ours = stack.enter_context(Ours(f"gaps-{name}", env))
            sides.append((name, ours.url, ours.key))
        gaps: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        for rnd in range(args.rounds):
            for name, url, key in (sides if rnd % 2 == 0 else sides[::-1]):
                g = under_load(url, key, args.heavy, f"g{rnd}{name}")
                gaps[name] += g
                print(f"  round {rnd + 1} {name:14} {summary(g)}  (load {load()})", flush=True)
    print(f"\ninter-token gaps of a chat stream while {args.heavy} users send ~1,000-token prompts")
    for name, g in gaps.items():
        print(f"  {name:14} {summary(g)}")


if __name__ == "__main__":
    main()
