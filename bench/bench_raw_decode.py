"""Raw llama.cpp batched decode on this machine, without our engine or HTTP.

    .venv/bin/python bench/bench_raw_decode.py [--steps 64] [--levels 1,2,4,8,16]

For each number of sequences n: a context with n sequences, one token of
prompt each, then ``--steps`` calls of ``llama_decode`` with one token per
sequence. Prints aggregate tokens/s and the ratio to n=1, for a per-sequence
KV stream (what BatchingEngine uses) and a unified KV buffer. This is the
ceiling any in-process batching scheduler can reach here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import llama_cpp
from llama_cpp import _internals
from llama_cpp import _logger as llama_log

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from model_api.engine.local import default_model_path, default_threads, load_backends  # noqa: E402


def decode_rate(model, n: int, steps: int, unified: bool, threads: int) -> float:
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n * 512
    cp.n_batch = cp.n_ubatch = max(512, n)
    cp.n_seq_max = n
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = unified
    cp.no_perf = True
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
    batch = llama_cpp.llama_batch_init(max(512, n), 0, 1)
    token = llama_cpp.llama_vocab_bos(model.vocab)

    def step(pos: int) -> None:
        batch.n_tokens = n
        for s in range(n):
            batch.token[s] = token
            batch.pos[s] = pos
            batch.n_seq_id[s] = 1
            batch.seq_id[s][0] = s
            batch.logits[s] = 1
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    step(0)
    t0 = time.perf_counter()
    for pos in range(1, steps + 1):
        step(pos)
    dt = time.perf_counter() - t0
    llama_cpp.llama_batch_free(batch)
    ctx.close()
    return n * steps / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args()
    llama_log.set_verbose(False)
    load_backends()  # the CPU backend of a runtime-dispatch build (engine/local.py)
    model = _internals.LlamaModel(path_model=default_model_path(), params=llama_cpp.llama_model_default_params(),
                                  verbose=False)
    print(f"threads {args.threads}, {args.steps} decode steps per level")
    print(f"{'seqs':>4} {'per-seq KV tok/s':>17} {'x n=1':>6} {'unified KV tok/s':>17} {'x n=1':>6}")
    base: dict[bool, float] = {}
    for n in (int(x) for x in args.levels.split(",")):
        row = []
        for unified in (False, True):
            r = decode_rate(model, n, args.steps, unified, args.threads)
            base.setdefault(unified, r)
            row += [r, r / base[unified]]
        print(f"{n:>4} {row[0]:>17.1f} {row[1]:>6.2f} {row[2]:>17.1f} {row[3]:>6.2f}")


if __name__ == "__main__":
    main()
