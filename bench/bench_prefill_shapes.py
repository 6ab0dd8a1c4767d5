"""How fast llama.cpp reads prompts here, by the shape of the decode call.

    .venv/bin/python bench/bench_prefill_shapes.py [--prompt 1024] [--seqs 8]

The batching engine decides how prompt tokens reach ``llama_decode``: how many
per step, whether several sequences' prompts share a call, whether they share
it with the generating sequences' tokens. This measures each choice on its own,
without the engine or HTTP, with the engine's context (one KV stream per
sequence, flash attention as configured) and prints prompt tokens/s:

* one sequence, its prompt in chunks of 128 / 512 tokens, a decode each;
* ``--seqs`` sequences, each chunk a decode of its own (as the engine did);
* the same chunks, all sequences in one decode;
* a step of ``--seqs - 1`` generated tokens plus one 128-token chunk, as two
  decodes and as one.
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


class Ctx:
    def __init__(self, model, n_seq: int, n_ctx_seq: int, n_batch: int, threads: int, flash: bool):
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_seq * n_ctx_seq
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False
        cp.no_perf = True
        cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
        self.mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n = 0
        self.token = 1000

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)

    def add(self, seq: int, pos: int, logits: bool = False) -> None:
        b, i = self.batch, self.n
        b.token[i] = self.token + (pos * 7 + seq) % 5000
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        self.n += 1

    def decode(self) -> None:
        self.batch.n_tokens = self.n
        if llama_cpp.llama_decode(self.ctx.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")
        self.n = 0

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        self.ctx.close()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--flash-attn", type=int, default=1)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--model", default=default_model_path())
    args = ap.parse_args()
    llama_log.set_verbose(False)
    load_backends()
    model = _internals.LlamaModel(path_model=args.model, params=llama_cpp.llama_model_default_params(),
                                  verbose=False)
    P, S = args.prompt, args.seqs
    c = Ctx(model, S, P + 64, 2048, args.threads, bool(args.flash_attn))

    def one_seq(chunk: int) -> float:
        c.clear()

        def run():
            for start in range(0, P, chunk):
                for pos in range(start, min(P, start + chunk)):
                    c.add(0, pos, pos == P - 1)
                c.decode()
        return P / timed(run)

    def many(chunk: int, together: bool) -> float:
        c.clear()

        def run():
            for start in range(0, P, chunk):
                for s in range(S):
                    for pos in range(start, min(P, start + chunk)):
                        c.add(s, pos, pos == P - 1)
                    if not together:
                        c.decode()
                if together:
                    c.decode()
        return S * P / timed(run)

    def gen_plus_chunk(mixed: bool) -> float:
        """S-1 sequences generate (at position ~P/2), sequence S-1 reads 128 tokens a step."""
        steps = min(8, P // 128)
        c.clear()
        for s in range(S - 1):  # their prompts, not timed
            for pos in range(P // 2):
                c.add(s, pos)
            c.decode()

        def run():
            for k in range(steps):
                for s in range(S - 1):
                    c.add(s, P // 2 + k, True)
                if not mixed:
                    c.decode()
                for pos in range(k * 128, (k + 1) * 128):
                    c.add(S - 1, pos)
                c.decode()
        return steps * 128 / timed(run)

    print(f"model {Path(args.model).name}, {args.threads} threads, flash attention {bool(args.flash_attn)}, "
          f"prompt {P} tokens, {S} sequences")
    one_seq(512)  # warm up
    rows = [
        ("1 sequence, 128-token chunks", one_seq(128)),
        ("1 sequence, 512-token chunks", one_seq(512)),
        (f"{S} sequences, 128-token chunks, a decode each", many(128, False)),
        (f"{S} sequences, 128-token chunks, one decode", many(128, True)),
        (f"{S} sequences, 256-token chunks, one decode", many(256, True)),
        (f"{S - 1} generating + a 128-token chunk, two decodes", gen_plus_chunk(False)),
        (f"{S - 1} generating + a 128-token chunk, one decode", gen_plus_chunk(True)),
    ]
    for name, rate in rows:
        print(f"  {name:55} {rate:8.1f} prompt tok/s")
    c.close()
    model.close()


if __name__ == "__main__":
    main()
