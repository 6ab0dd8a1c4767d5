"""Continuous batching on llama.cpp's low-level API.

One scheduler thread owns the llama context.  Request threads tokenize their
prompt, queue a :class:`_Sequence` and read text deltas from its queue.  Each
scheduler step:

1. drops cancelled sequences and admits waiting ones into free slots
   (one llama.cpp sequence id -- one KV stream -- per slot).  A free slot
   remembers the prompt tokens its last sequence left in its KV cells; a
   newcomer goes to the free slot whose tokens share the longest prefix with
   its prompt, keeps those cells and decodes only the rest of its prompt
   (chat prompts all start with the same template text, and prefill costs
   nearly as much per token as generation);
2. decodes the last sampled token of every generating sequence in one
   ``llama_decode``;
3. decodes a bounded amount of prompt tokens from sequences still reading
   their prompt (so a long prompt delays running streams by one chunk per
   step, not by its whole length), each sequence's chunk in a ``llama_decode``
   of its own;
4. after each decode, samples one token per sequence that produced logits,
   with that sequence's own sampler chain (at temperature 0, the top logit,
   read in place), and streams the detokenized text;
5. retires finished sequences (end-of-generation token, stop string,
   max_tokens, end of the sequence's context, cancellation), leaving their
   KV cells to the slot's next sequence; a failed sequence's are cleared.

The KV cache is split per sequence (``kv_unified = False``): every sequence
owns ``n_ctx_per_seq`` cells and attends only to its own stream, so its
logits do not depend on what else is being decoded -- with one condition.
llama.cpp's CPU attention takes another path, with other rounding, when a
sequence has a single token in a micro-batch, and llama.cpp splits a batch
into micro-batches of equally many tokens per sequence.  So a generated token
(always one per sequence) is computed one way and a prompt token must always
be computed the other way, as a whole-prompt prefill would: a prompt chunk is
never mixed with other sequences' tokens and never a single token (unless the
prompt is).  Then greedy text is bit-identical alone or batched (measured;
the tests check it).  It is also why only prompt tokens' cells are reused
(at least two tokens of every prompt are decoded): a generated token's cells
differ from those a later prompt containing that token would compute, and
reusing them changes the text.  The unified layout is available but is not
batch-invariant.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import logging
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp import _logger as llama_log

from .base import Completion, EngineBusy, EngineError, Generation, PreparedPrompt, SamplingParams
from .grammar import gbnf
from .local import LocalGGUFEngine, default_model_path, default_threads, load_backends
from .scheduling import Scheduler, make_queue, tenant_key
from .stops import StopMatcher

log = logging.getLogger(__name__)

# llama.cpp's llama_token_data, as a numpy record: a whole vocabulary of candidates
# is filled from the logits without a Python loop.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

# Messages from the scheduler to a request thread.
_DELTA, _DONE, _ERROR = 0, 1, 2


@dataclass(eq=False)
class _Sequence:
    """One request's state; owned by the scheduler once submitted."""

    prompt: list[int]
    params: SamplingParams
    cancel: threading.Event
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    t_submit: float = field(default_factory=time.monotonic)
    slot: int = -1
    n_cached: int = 0  # prompt tokens whose KV cells were in the slot already
    n_fed: int = 0  # prompt tokens in the KV cells (cached or decoded)
    n_gen: int = 0  # tokens generated (end-of-generation token excluded)
    last_token: int = -1  # sampled, not yet decoded
    sampler: Any = None
    grammar: Any = None  # response_format's grammar sampler (kept out of the chain: see _sample)
    decoder: Any = None
    stops: StopMatcher | None = None
    parts: list[str] = field(default_factory=list)
    t_first: float | None = None
    tenant: Any = None  # whom it is for (scheduling.tenant_key): the fair queue's unit

    def __post_init__(self) -> None:
        self.tenant = tenant_key(self.tenant, self)

    @property
    def prefilling(self) -> bool:
        return self.n_fed < len(self.prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchingEngine(LocalGGUFEngine):
    """Serves up to ``n_parallel`` generations at once from one llama context."""

    backend = "llama.cpp (continuous batching)"

    def __init__(
        self,
        model_path: str | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_parallel: int = 8,
        n_ctx_per_seq: int = 2048,
        max_queue: int = 64,
        prefill_chunk: int | None = None,
        flash_attn: bool = True,
        kv_unified: bool = False,
        model_name: str | None = None,
        verbose: bool = False,
        scheduler: Scheduler = "fair",
    ):
        if n_parallel < 1 or max_queue < 0:
            raise ValueError("n_parallel must be >= 1 and max_queue >= 0")
        self.model_path = model_path or default_model_path()
        self.n_parallel = n_parallel
        # At least 3, as prefill_chunk: a chunk never leaves a single prompt
        # token for later (see _prompt_chunk), so a budget of 2 could stall.
        self.n_batch = max(n_batch, n_parallel, 3)
        self.max_queue = max_queue
        # Prompt tokens a step may decode while other sequences generate (a step
        # with no generating sequence may decode a whole batch). By default a whole
        # batch too: every step also decodes the generating sequences' tokens, a
        # pass over all the weights, and with 128-token chunks that pass was ~10 %
        # of the time of a step under long prompts. A smaller chunk delays running
        # streams less while a long prompt is read (bench/RESULTS.md).
        self.prefill_chunk = max(3, min(prefill_chunk or self.n_batch, self.n_batch))
        self.n_threads = n_threads or default_threads()

        # As Llama(verbose=False) does: only errors from llama.cpp's log.
        llama_log.set_verbose(verbose)
        load_backends()
        mparams = llama_cpp.llama_model_default_params()
        # verbose=True only stops LlamaModel from pointing the process's fd 2 at
        # /dev/null while it loads (see the context below); llama.cpp's messages
        # are filtered by the log callback set above either way.
        self._adopt(_internals.LlamaModel(path_model=self.model_path, params=mparams, verbose=True), model_name)
        self._vocab = self._model.vocab

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_parallel * n_ctx_per_seq
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = n_parallel
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        # One KV stream per sequence (the default): a sequence attends only to
        # its own stream, laid out exactly as if it ran alone, so its logits are
        # bit-identical batched or not.  A unified buffer interleaves the
        # sequences' cells, which changes the float summation order in
        # attention: greedy text then diverged within 24 tokens in our tests.
        cparams.kv_unified = kv_unified
        cparams.no_perf = True
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        try:
            # LlamaContext frees the context on close() (and before the model).
            # Not inside llama-cpp-python's suppress_stdout_stderr: it points the
            # whole process's fd 2 at /dev/null, so every other thread's log lines
            # (the access log of requests served while the model loads) were lost.
            self._context = _internals.LlamaContext(model=self._model, params=cparams, verbose=True)
        except Exception as exc:
            self._model.close()
            raise EngineError(f"llama.cpp could not create a context: {exc}") from exc
        self._ctx = self._context.ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        # With a unified cache llama.cpp would let one sequence grow to the
        # whole n_ctx; the scheduler holds every sequence to its share.
        self.n_ctx_per_seq = min(n_ctx_per_seq, llama_cpp.llama_n_ctx_seq(self._ctx))
        self.context_size = self.n_ctx_per_seq
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        # response_format (scheduler thread only): one token checked, or every token masked
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._candidates = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
        self._logits_row = ctypes.c_float * self._n_vocab  # one token's logits, read in place (_greedy)

        self._cond = threading.Condition()
        # who gets the next free slot (engine/scheduling.py); `fair`: users in turn, and
        # one user may fill at most half the wait queue (the rest is others' room)
        self._waiting = make_queue(scheduler)
        self._tenant_queue = max(1, (max_queue + 1) // 2)
        self._last_seen: dict[Any, float] = {}  # tenant -> when it last submitted (fair: slot reserve)
        self._slots: list[_Sequence | None] = [None] * n_parallel
        # Per free slot: the prompt tokens whose KV cells it still holds.
        self._slot_prompts: list[list[int]] = [[] for _ in range(n_parallel)]
        self._stopping = False
        self._closed = False

        # Throughput estimates for Retry-After (EWMAs, updated by the scheduler).
        self._tps = 50.0  # generated tokens per second, all sequences together
        self._tokens_per_request = 128.0
        self._win_tokens = 0
        self._win_start: float | None = None

        self._thread = threading.Thread(
            target=self._run, name="batching-engine-scheduler", daemon=True
        )
        self._thread.start()

    # -- admission -------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds until the wait queue has likely drained: the queued requests
        times the average tokens a request generates, over the measured
        aggregate tokens/s (both EWMAs); never less than 1."""
        with self._cond:
            depth = len(self._waiting)
        work = max(depth, 1) * self._tokens_per_request
        return max(1, math.ceil(work / max(self._tps, 1e-3)))

    def stream(self, prompt: PreparedPrompt, cancel: threading.Event | None = None, *,
               incremental: bool = True) -> Generation:
        assert prompt.tokens is not None, "a prompt prepared by this engine"
        tenant = prompt.request.tenant
        seq = _Sequence(prompt=prompt.tokens, params=prompt.params, cancel=cancel or threading.Event(), tenant=tenant)
        with self._cond:
            if self._closed:
                raise EngineError("engine is closed")
            free = sum(s is None for s in self._slots)
            if len(self._waiting) >= self.max_queue + free:
                busy = True
            elif self._waiting.fair and self._waiting.waiting(seq.tenant) >= self._tenant_queue + free:
                busy = True  # this user's share of the queue is full; others still have room
            else:
                busy = False
                self._waiting.push(seq, tenant)
                self._last_seen[seq.tenant] = seq.t_submit
                self._cond.notify()
        if busy:
            raise EngineBusy(self.retry_after())
        return _BatchGeneration(self, seq)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- scheduler -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not any(self._slots):
                    self._win_start = None  # idle time is not throughput
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception as exc:  # a bug or llama.cpp failure: fail, don't die
                log.exception("batching scheduler step failed")
                self._fail_all(EngineError(f"generation failed: {exc}"))
        self._fail_all(EngineError("engine is shutting down"))

    def _step(self) -> None:
        now = time.monotonic()
        # 1. leave: cancelled sequences; join: waiting ones, while slots are free.
        for seq in self._slots:
            if seq is not None and seq.cancel.is_set():
                self._retire(seq, "cancelled")
        with self._cond:
            for seq in [s for s in self._waiting if s.cancel.is_set()]:
                self._waiting.remove(seq)
                self._send_done(seq, "cancelled")
            while self._waiting and None in self._slots:
                seq = self._waiting.pop(self._may_take_slot)
                if seq is None:
                    break
                self._admit(seq)
        active = [s for s in self._slots if s is not None]
        if not active:
            return

        # 2. one batch: a token from each generating sequence (then 4-5 for them).
        generating = [s for s in active if not s.prefilling]
        for i, seq in enumerate(generating):
            self._put(i, seq.last_token, len(seq.prompt) + seq.n_gen - 1, seq.slot, True)
        if generating and not self._decode(len(generating)):
            return
        for i, seq in enumerate(generating):
            self._sample(seq, i)
        sampled = len(generating)

        # 3. prompt chunks, oldest request first, each in a batch of its own:
        # llama.cpp would split a mixed batch into micro-batches holding one
        # token per sequence, and compute those prompt tokens as generated
        # ones (see the module docstring).
        budget = self.prefill_chunk if generating else self.n_batch
        for seq in sorted((s for s in active if s.prefilling), key=lambda s: s.t_submit):
            take = self._prompt_chunk(seq, budget)
            if take == 0:
                break
            for i in range(take):
                pos = seq.n_fed + i
                self._put(i, seq.prompt[pos], pos, seq.slot, pos == len(seq.prompt) - 1)
            if not self._decode(take):
                return
            seq.n_fed += take
            budget -= take
            if not seq.prefilling:
                self._sample(seq, take - 1)  # the prompt is read: its first token
                sampled += 1
        self._measure(now, sampled)

    #: seconds a user counts as active after its last request (fair: see _may_take_slot)
    ACTIVE_SECONDS = 5.0

    def _may_take_slot(self, tenant: Any) -> bool:
        """Fair scheduling: a user may fill every slot only while nobody else is
        active (has work here, or asked within ACTIVE_SECONDS); otherwise one
        slot stays out of its reach, so another user's request starts within a
        step instead of waiting for one of its long generations to end."""
        if self.n_parallel < 2:
            return True
        mine = sum(1 for s in self._slots if s is not None and s.tenant == tenant)
        if mine < self.n_parallel - 1:
            return True
        now = time.monotonic()
        for key, seen in list(self._last_seen.items()):
            if now - seen > self.ACTIVE_SECONDS:
                del self._last_seen[key]  # forgotten: the map stays as small as the active users
        others = (len(self._waiting) > self._waiting.waiting(tenant)
                  or any(s is not None and s.tenant != tenant for s in self._slots)
                  or any(key != tenant for key in self._last_seen))
        return not others

    @staticmethod
    def _prompt_chunk(seq: _Sequence, budget: int) -> int:
        """How many prompt tokens to decode now: at most ``budget``, and never a
        lone token, neither now nor left for later (a prompt of one token
        excepted), so every prompt token is computed alongside another one."""
        left = len(seq.prompt) - seq.n_fed
        take = min(budget, left)
        if left - take == 1:
            take -= 1
        return take if take >= min(2, left) else 0

    def _decode(self, n: int) -> bool:
        """Decode the first ``n`` entries of the batch; on failure fail every
        sequence (the KV cells are in an unknown state) and return False."""
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc == 0:
            return True
        err = EngineError(f"llama_decode failed with status {rc}")
        for seq in self._slots:
            if seq is not None:
                self._retire(seq, None, err)
        return False

    def _sample(self, seq: _Sequence, index: int) -> None:
        """4-5. sample from the logits at ``index`` of the last decode, stream, retire."""
        try:
            if seq.params.greedy:
                token = self._greedy(index)
            else:
                token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, index)
            if seq.grammar is not None:
                token = self._constrain(seq, index, token)
            self._advance(seq, token)
        except Exception as exc:
            log.exception("sampling failed")
            self._retire(seq, None, EngineError(f"sampling failed: {exc}"))

    def _greedy(self, index: int) -> int:
        """The most likely token at ``index`` of the last decode: the token
        llama.cpp's greedy sampler picks (of finite logits, the first of equal
        maxima, as numpy's argmax), at a tenth of its cost. The sampler first
        copies the whole vocabulary into a candidate array (~50 µs a token on
        these 2-core machines, paid by every sequence at every step); numpy
        reads the logits where llama.cpp left them (~5 µs)."""
        logits = llama_cpp.llama_get_logits_ith(self._ctx, index)
        row = self._logits_row.from_address(ctypes.addressof(logits.contents))
        return int(np.frombuffer(row, dtype=np.float32).argmax())

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _admit(self, seq: _Sequence) -> None:
        """Put ``seq`` in the free slot whose cells hold the longest prefix of
        its prompt; keep that prefix's cells and drop the slot's others."""
        shared = {i: _common_prefix(self._slot_prompts[i], seq.prompt)
                  for i, s in enumerate(self._slots) if s is None}
        slot = max(shared, key=shared.__getitem__)
        # Decode at least the last two prompt tokens: the last one's logits
        # give the first token, and a single decoded prompt token would be
        # computed as a generated one (see the module docstring).
        keep = max(0, min(shared[slot], len(seq.prompt) - 2))
        if not llama_cpp.llama_memory_seq_rm(self._mem, slot, keep, -1):
            # This memory cannot drop part of a sequence: start from nothing.
            llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
            keep = 0
        self._slot_prompts[slot] = []  # the cells are the sequence's now
        seq.slot = slot
        seq.n_cached = seq.n_fed = keep
        self._slots[slot] = seq
        seq.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        seq.stops = StopMatcher(seq.params.stop)
        fmt = seq.params.response_format
        try:
            # greedy text reads the top logit in place (_greedy): a chain only for a
            # grammar's masked draw (_constrain), or to sample at a temperature
            if fmt is not None or not seq.params.greedy:
                seq.sampler = self._make_sampler(seq.params)
            if fmt is not None:
                seq.grammar = llama_cpp.llama_sampler_init_grammar(
                    self._vocab, gbnf(fmt).encode(), b"root")
                if not seq.grammar:
                    raise EngineError("llama.cpp refused the response_format grammar")
        except Exception as exc:  # this request's grammar: fail it alone
            self._retire(seq, None, exc if isinstance(exc, EngineError) else EngineError(str(exc)))

    def _constrain(self, seq: _Sequence, index: int, token: int) -> int:
        """The grammar's say on a sampled token (response_format).

        Checking one token against the grammar is cheap; masking the whole
        vocabulary costs tens of milliseconds a token. So, as llama.cpp's own
        sampler does, the token drawn freely is kept when the grammar allows it,
        and only otherwise are the logits masked by the grammar and the draw
        repeated from what is left: a token comes out with the probability the
        masked distribution gives it (greedy: the same token), at a fraction of
        the cost, as most tokens of a reply the model is steered into are allowed.
        The end-of-generation token passes only once the JSON is complete."""
        one = self._one
        one[0].id, one[0].logit, one[0].p = token, 1.0, 0.0
        single = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(seq.grammar, ctypes.byref(single))
        if not math.isinf(one[0].logit):
            llama_cpp.llama_sampler_accept(seq.grammar, token)
            return token
        n = self._n_vocab
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(n,))
        buf = self._candidates
        buf["id"] = np.arange(n, dtype=np.int32)
        buf["logit"] = logits
        buf["p"] = 0.0
        data = buf.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        cur = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(seq.grammar, ctypes.byref(cur))
        llama_cpp.llama_sampler_apply(seq.sampler, ctypes.byref(cur))  # top-p, temperature, the draw
        if cur.selected < 0:
            raise EngineError("the response_format grammar allows no token here")
        token = int(cur.data[cur.selected].id)
        llama_cpp.llama_sampler_accept(seq.grammar, token)
        return token

    @staticmethod
    def _make_sampler(p: SamplingParams) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if p.greedy:  # a response_format grammar's masked draw (_constrain)
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_p < 1.0:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
            seed = p.seed if p.seed is not None else random.getrandbits(32)
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Take a sampled token: stream its text or retire the sequence."""
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._retire(seq, "stop")
            return
        seq.n_gen += 1
        seq.last_token = token
        assert seq.stops is not None
        text = seq.stops.feed(seq.decoder.decode(self._token_bytes(token)))
        if text:
            self._emit(seq, text)
        p = seq.params
        if seq.stops.stopped:
            self._retire(seq, "stop")
        elif p.max_tokens > 0 and seq.n_gen >= p.max_tokens:
            self._retire(seq, "length")
        elif len(seq.prompt) + seq.n_gen >= self.n_ctx_per_seq:
            self._retire(seq, "length")  # no room to decode the token just sampled

    def _emit(self, seq: _Sequence, text: str) -> None:
        if seq.t_first is None:
            seq.t_first = time.monotonic()
        seq.parts.append(text)
        seq.out.put((_DELTA, text))

    def _retire(self, seq: _Sequence, reason: str | None, error: Exception | None = None) -> None:
        """Free the slot and the sampler and tell the request thread.  The slot
        keeps the cells of the prompt tokens decoded so far for a later prompt
        with the same start, unless the sequence failed: then they are cleared."""
        if seq.slot >= 0 and self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
            if error is None and reason is not None:
                self._slot_prompts[seq.slot] = seq.prompt[: seq.n_fed]
            else:
                self._slot_prompts[seq.slot] = []
                try:
                    llama_cpp.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
                except Exception:
                    log.exception("could not clear a sequence's KV cells")
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        if seq.grammar is not None:
            llama_cpp.llama_sampler_free(seq.grammar)
            seq.grammar = None
        if error is not None or reason is None:
            seq.out.put((_ERROR, error or EngineError("generation failed")))
            return
        if reason != "cancelled" and seq.decoder is not None and seq.stops is not None:
            # The decoder's last bytes are text like any other: a stop string
            # may end in them (as in LlamaEngine, they go through the matcher).
            tail = seq.stops.feed(seq.decoder.decode(b"", final=True))
            if seq.stops.stopped:
                reason = "stop"
            else:
                tail += seq.stops.flush()
            if tail:
                self._emit(seq, tail)
        if reason in ("stop", "length"):
            a = 0.2
            self._tokens_per_request += a * (max(seq.n_gen, 1) - self._tokens_per_request)
        self._send_done(seq, reason)

    def _send_done(self, seq: _Sequence, reason: str) -> None:
        now = time.monotonic()
        seq.out.put((_DONE, Completion(
            text="".join(seq.parts),
            prompt_tokens=len(seq.prompt),
            completion_tokens=seq.n_gen,
            cached_tokens=seq.n_cached,
            finish_reason=reason,
            model=self.model_name,
            time_to_first_token=None if seq.t_first is None else seq.t_first - seq.t_submit,
            generation_seconds=now - seq.t_submit,
        )))

    def _measure(self, step_start: float, sampled: int) -> None:
        now = time.monotonic()
        if self._win_start is None:
            self._win_start = step_start
            self._win_tokens = 0
        self._win_tokens += sampled
        span = now - self._win_start
        if span >= 0.5:
            rate = self._win_tokens / span
            self._tps += 0.3 * (rate - self._tps)
            self._win_start, self._win_tokens = now, 0

    def _fail_all(self, error: EngineError) -> None:
        for seq in list(self._slots):
            if seq is not None:
                self._retire(seq, None, error)
        with self._cond:
            waiting = self._waiting.drain()
        for seq in waiting:
            seq.out.put((_ERROR, error))

    # -- facts and shutdown ----------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "active": sum(s is not None for s in self._slots),
                "waiting": len(self._waiting),
                "tokens_per_second": self._tps,
                "tokens_per_request": self._tokens_per_request,
            }

    def info(self) -> dict[str, Any]:
        return {**super().info(), "n_parallel": self.n_parallel, "max_queue": self.max_queue,
                "scheduler": "fair" if self._waiting.fair else "fifo"}

    def in_flight(self) -> int:
        with self._cond:
            return len(self._waiting) + sum(s is not None for s in self._slots)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self._context.close()
        self._ctx = None
        self._model.close()


class _BatchGeneration(Generation):
    """The request thread's end of a sequence: text deltas arrive on a queue."""

    def __init__(self, engine: BatchingEngine, seq: _Sequence):
        self._engine = engine
        self._seq = seq
        self._done = False
        self._reading = threading.Lock()
        self.result = None

    def __next__(self) -> str:
        with self._reading:
            return self._next()

    def _next(self) -> str:
        if self._done:
            raise StopIteration
        kind, value = self._seq.out.get()
        if kind == _DELTA:
            return value
        self._done = True
        if kind == _DONE:
            self.result = value
            raise StopIteration
        raise value

    def close(self) -> None:
        """Cancel; the slot is freed at the scheduler's next step.  When called
        from the reading thread, waits for the final result (text so far)."""
        if self._done:
            return
        self._seq.cancel.set()
        self._engine._wake()
        if self._reading.acquire(blocking=False):
            try:
                deadline = time.monotonic() + 10.0
                while not self._done and time.monotonic() < deadline:
                    try:
                        kind, value = self._seq.out.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if kind == _DONE:
                        self.result = value
                        self._done = True
                    elif kind == _ERROR:
                        self._done = True
            finally:
                self._reading.release()

    def __del__(self) -> None:
        if not self._done:
            self._seq.cancel.set()
