"""Where the batching engine's time goes, pass by pass, under a bench workload.

    PYTHONPATH=src python bench/bench_passes.py [--users 8] [--workload prompt] [--kv-unified]

Runs the workload of bench_vs_llama_server.py (``--users`` client threads,
``--per-user`` requests each, its prompts) through BatchingEngine as `make run`
builds it from the MODEL_* settings, in this process (no HTTP), and times
every ``llama_decode``:

- passes of generating tokens (one token per generating sequence, step 2 of
  the scheduler) and prompt passes (step 3), with their share of the wall time;
- generating passes by how many tokens they held and how many runs of
  consecutive sequence ids (with a KV cache per sequence, llama.cpp computes
  each run as a micro-batch of its own: a pass over the weights).

``--kv-unified`` builds the engine with one KV cache for all sequences (what
sharing one ``llama_decode`` between generating tokens and a prompt chunk would
need), to compare. A diagnostic for bench/RESULTS.md: read it beside a run of
the side-by-side bench, not as a ratio to llama-server.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_llama_server import WORKLOADS, run_in_process  # noqa: E402

from model_api.engine.batching import BatchingEngine  # noqa: E402
from model_api.engine.registry import batching_args  # noqa: E402
from model_api.settings import ModelSettings  # noqa: E402


class TimedEngine(BatchingEngine):
    """The engine with every decode timed by kind (the scheduler thread only writes these)."""

    def __init__(self, **kw):
        self.passes: dict[str, list[tuple[int, int, float]]] = collections.defaultdict(list)
        super().__init__(**kw)

    def _decode(self, n: int) -> bool:
        ids = [self._batch.seq_id[i][0] for i in range(n)]
        seq = self._slots[ids[0]]
        kind = "prompt" if seq is not None and seq.prefilling else "generating"
        runs = 1 + sum(1 for a, b in zip(ids, ids[1:]) if b != a + 1)
        t0 = time.perf_counter()
        ok = super()._decode(n)
        self.passes[kind].append((n, runs, time.perf_counter() - t0))
        return ok


def run(engine: TimedEngine, workload: str, users: int, per_user: int, salt: str) -> tuple[float, int]:
    """Wall seconds and tokens (prompt and generated) of one level, its passes alone in ``engine.passes``."""
    engine.passes.clear()
    wall, prompt_tokens, completion_tokens = run_in_process(engine, workload, users, per_user, salt)
    return wall, prompt_tokens + completion_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--per-user", type=int, default=2)
    ap.add_argument("--workload", default="prompt", choices=list(WORKLOADS))
    ap.add_argument("--kv-unified", action="store_true", help="one KV cache for all sequences")
    args = ap.parse_args()

    # as `make run` builds it (engine/registry.py build_engine), from the same settings
    engine = TimedEngine(**batching_args(ModelSettings()), kv_unified=args.kv_unified)
    try:
        run(engine, args.workload, 2, 1, "warm-up")
        wall, tokens = run(engine, args.workload, args.users, args.per_user, f"passes-{time.time()}")
    finally:
        engine.close()
    print(f"{args.workload}, {args.users} users x {args.per_user}, kv_unified={args.kv_unified}: "
          f"{wall:.1f} s, {tokens} tokens, {tokens / wall:.1f} tok/s")
    for kind, passes in sorted(engine.passes.items()):
        seconds = sum(d for _, _, d in passes)
        print(f"  {kind:10} {len(passes):4} passes {seconds:7.2f} s ({seconds / wall:5.1%} of the wall time), "
              f"{sum(n for n, _, _ in passes)} tokens, {seconds / len(passes) * 1000:.0f} ms a pass")
    shapes = collections.defaultdict(list)
    for n, runs, d in engine.passes.get("generating", []):
        shapes[(n, runs)].append(d * 1000)
    for (n, runs), times in sorted(shapes.items()):
        median = statistics.median(times)
        print(f"  generating pass of {n} tokens in {runs} run(s): {len(times):3} passes, "
              f"median {median:.1f} ms ({median / n:.1f} ms a token)")


if __name__ == "__main__":
    main()
