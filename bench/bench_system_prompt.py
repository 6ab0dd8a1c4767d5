"""Time to first token when every call carries the same long system prompt, against llama-server.

    .venv/bin/python bench/bench_system_prompt.py [--calls 60] [--rules 60] [--base CHECKOUT]

What an assistant, a RAG front end or an agent with tool definitions sends: a
long system prompt (``--rules`` numbered rules: 60 make ~1,400 tokens), the
same on every call, and a short question of its own. Both servers keep the
system prompt's KV cells from the call before, so the model reads only the
question; what is left before the first token is the server's own work, which
for a prompt that long includes tokenizing it (engine/chat_template.py
remembers the pieces of a prompt between special tokens, and tokenizes only
the question). One user, one-token replies, streamed; the sides take turns, a
different one first each round. ``--base`` puts another checkout of ours in
the same rounds (an A/B of a change).

llama-server and ours as ``bench_vs_llama_server.py`` starts them (its
helpers, the same cached llama-server build). Prints time to first token and
whole-call p50/p99 per side, and ours against each other side.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_llama_server import (  # noqa: E402  (the sibling script's helpers)
    OUT, LlamaServer, Ours, in_turn, llama_cpp_version, llama_server_binary, load, pct, stream_chat,
)


def system_prompt(rules: int) -> str:
    return "You are the support assistant of Example Corp. Follow these rules.\n" + "\n".join(
        f"Rule {i}: when asked about topic {i}, answer politely and cite policy section {i}." for i in range(rules))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=60, help="calls a side")
    ap.add_argument("--rules", type=int, default=60, help="rules in the system prompt (60: ~1,400 tokens)")
    ap.add_argument("--base", type=Path, metavar="CHECKOUT", help="also run another checkout of ours")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    from model_api.engine.local import default_model_path

    system = system_prompt(args.rules)
    with contextlib.ExitStack() as stack:
        ls = stack.enter_context(LlamaServer(llama_server_binary(llama_cpp_version()), default_model_path(),
                                             os.cpu_count() or 2))
        sides = {"llama-server": (ls.url, None)}
        ours = stack.enter_context(Ours("system-prompt"))
        sides["ours"] = (ours.url, ours.key)
        if args.base is not None:
            base = stack.enter_context(Ours("system-prompt-base", root=args.base))
            sides["ours-base"] = (base.url, base.key)
        sessions = {name: requests.Session() for name in sides}
        for name, (url, key) in sides.items():  # the system prompt's KV cells, and warm connections
            for j in range(3):
                stream_chat(sessions[name], url, key, f"Warm-up question {j}.", 1, system=system)
        results: dict[str, list[dict]] = {name: [] for name in sides}
        for i in range(args.calls):
            for name, (url, key) in in_turn(list(sides.items()), i):
                question = f"Question {i}: what does rule {i % args.rules} say?"
                results[name].append(stream_chat(sessions[name], url, key, question, 1, system=system))
    tokens = results["ours"][0]["prompt_tokens"]
    print(f"\n# system prompt of {args.rules} rules ({tokens} prompt tokens a call), {args.calls} calls a side, "
          f"load {load()}")
    ttft = {name: [r["ttft"] * 1000 for r in rs] for name, rs in results.items()}
    total = {name: [r["seconds"] * 1000 for r in rs] for name, rs in results.items()}
    for name in sides:
        print(f"  {name:13} TTFT p50 {pct(ttft[name], 50):6.1f} ms  p99 {pct(ttft[name], 99):6.1f} ms   "
              f"whole call p50 {pct(total[name], 50):6.1f} ms")
    for other in (n for n in sides if n != "ours"):
        print(f"  ours / {other}: TTFT p50 {pct(ttft['ours'], 50) / pct(ttft[other], 50):.2f}x")


if __name__ == "__main__":
    main()
