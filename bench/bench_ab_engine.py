"""A/B of engine configurations: each arm in a fresh process, arms interleaved.

    .venv/bin/python bench/bench_ab_engine.py --arm default --arm deterministic:deterministic=1 \\
        [--arm avx2:path=/dir/with/another/llama_cpp] [--rounds 3] [--levels 1,8] [--workload chat|prompt]

An arm is ``NAME[:key=value,...]``: ``deterministic=1`` builds the engine as
MODEL_DETERMINISTIC=1 does (flash attention off); ``path=DIR`` puts DIR first
on PYTHONPATH, so another build of llama-cpp-python installed there with
``pip install --target DIR --no-deps WHEEL`` is the one imported; an
upper-case key (``OMP_PROC_BIND=close``) is set in the arm's environment.
Each round runs every arm once (the order reversed every other round), each
in its own process: the engine as ``make run`` builds it
(``registry.batching_args`` of the default settings), ``users`` closed-loop
clients, two greedy requests each of the side-by-side bench's workloads
(bench_vs_llama_server.py): ``chat`` (a short prompt, 128 tokens out;
tokens/s counts generated tokens) or ``prompt``
(~1,000-token unique prompts, 16 out; prompt and generated tokens).
``--max-tokens`` overrides the workload's reply length. Prints per-arm medians,
ratios to the first arm and the load average with every result: on a shared
machine, read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_vs_llama_server import WORKLOADS, arm, run_in_process  # noqa: E402


def child(spec: dict) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from model_api.engine.base import GenerationRequest, SamplingParams
    from model_api.engine.batching import BatchingEngine
    from model_api.engine.local import load_backends
    from model_api.engine.registry import batching_args
    from model_api.settings import ModelSettings

    variant = load_backends(only=spec["variant"])
    engine = BatchingEngine(**batching_args(ModelSettings(deterministic=spec["deterministic"])))
    out = {"variant": variant}
    workload = spec["workload"]
    try:
        engine.generate(GenerationRequest.single_prompt("Hi", SamplingParams(max_tokens=4, temperature=0)))
        for users in spec["levels"]:
            wall, prompt_tokens, completion_tokens = run_in_process(
                engine, workload, users, 2, f"{spec['salt']}-{users}", spec["max_tokens"])
            tokens = completion_tokens + (prompt_tokens if workload == "prompt" else 0)
            out[str(users)] = tokens / wall
    finally:
        engine.close()
    print(json.dumps(out))


def parse_arm(text: str) -> dict:
    name, opts = arm(text, ("path", "deterministic", "variant"))
    return {"name": name, "path": opts.get("path"), "deterministic": opts.get("deterministic") == "1",
            "variant": opts.get("variant"), "env": {k: v for k, v in opts.items() if k.isupper()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="append", required=True, type=parse_arm)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--workload", default="chat", choices=list(WORKLOADS))
    ap.add_argument("--max-tokens", type=int, help="reply length (default: the workload's)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    levels = [int(x) for x in args.levels.split(",")]
    arms = args.arm
    results: dict[str, list[dict]] = {a["name"]: [] for a in arms}
    for rnd in range(args.rounds):
        for arm in (arms if rnd % 2 == 0 else arms[::-1]):
            env = {**os.environ, **arm["env"]}
            if arm["path"]:
                env["PYTHONPATH"] = os.pathsep.join([arm["path"], env.get("PYTHONPATH", "")])
            spec = json.dumps({"deterministic": arm["deterministic"], "variant": arm["variant"], "levels": levels,
                               "max_tokens": args.max_tokens, "workload": args.workload,
                               "salt": f"{rnd}{arm['name']}"})
            out = subprocess.run([sys.executable, __file__, "--arm", arm["name"], "--child", spec], env=env,
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            res["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
            results[arm["name"]].append(res)
            print(f"round {rnd + 1} {arm['name']:14} ({res['variant'] or 'linked-in CPU backend'}) "
                  + "  ".join(f"{u} users {res[str(u)]:6.1f} tok/s" for u in levels) + f"  load {res['load']}",
                  flush=True)
    base = arms[0]["name"]
    print(f"\nmedian tok/s (ratio to {base})")
    for name, rs in results.items():
        cells = []
        for u in levels:
            med = statistics.median(r[str(u)] for r in rs)
            ref = statistics.median(r[str(u)] for r in results[base])
            cells.append(f"{u} users {med:6.1f} ({med / ref:.2f}×)")
        print(f"  {name:14} " + "  ".join(cells))


if __name__ == "__main__":
    main()
