"""Both engines against the real SmolLM2-135M model (small max_tokens: fast)."""

from __future__ import annotations

import threading
import time

import pytest

from model_api.engine.base import ContextOverflow, EngineBusy, GenerationRequest, SamplingParams

pytestmark = pytest.mark.model

ENGINES = ["llama_engine", "batching_engine", "fast_batching_engine"]


def start(engine, request: GenerationRequest, cancel: threading.Event | None = None):
    """A generation of ``request``, prepared by the engine as the services do."""
    return engine.stream(engine.prepare(request), cancel)


def prepared_tokens(engine, request: GenerationRequest) -> int:
    return engine.prepare(request).n_tokens


def chat(text: str, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 16)
    return GenerationRequest.single_prompt(text, SamplingParams(**params))


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
]


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.getfixturevalue(request.param)


def test_multi_token_prompt_generates(engine):
    # A many-token prompt decodes as one batch: this is what crashed native
    # (AMX) builds, so it guards the portable build too.
    req = GenerationRequest.chat(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me about the history of Paris in a few words."},
        ],
        SamplingParams(max_tokens=8, temperature=0.0),
    )
    res = engine.generate(req)
    assert res.prompt_tokens > 20
    assert res.prompt_tokens == engine.prepare(req).n_tokens
    assert res.completion_tokens > 0
    assert res.text.strip()
    assert res.finish_reason in ("stop", "length")
    assert res.model == engine.model_name


def test_max_tokens_gives_length(engine):
    res = engine.generate(chat("Write a long story about a dragon.", max_tokens=5))
    assert res.finish_reason == "length"
    assert res.completion_tokens == 5
    assert res.time_to_first_token is not None
    assert res.generation_seconds >= res.time_to_first_token


def test_stop_string_gives_stop_and_is_not_emitted(engine):
    base = engine.generate(chat("Write a long story about a dragon.", max_tokens=24))
    words = base.text.split()
    assert len(words) > 4, base.text
    stop = words[3]
    cut = base.text.index(stop)
    req = chat("Write a long story about a dragon.", max_tokens=24, stop=(stop,))
    deltas = []
    gen = start(engine, req)
    for d in gen:
        deltas.append(d)
    res = gen.result
    assert res.finish_reason == "stop"
    assert res.text == base.text[:cut]
    assert "".join(deltas) == res.text
    assert stop not in res.text


def test_end_of_generation_gives_stop(engine):
    res = engine.generate(chat("Say only the word yes.", max_tokens=64))
    assert res.finish_reason == "stop", res
    assert res.completion_tokens < 64


def test_streaming_is_incremental(engine):
    gen = start(engine, chat("Write a long story about a dragon.", max_tokens=32))
    t0 = time.monotonic()
    first_at = None
    n = 0
    for _ in gen:
        n += 1
        if first_at is None:
            first_at = time.monotonic() - t0
    total = time.monotonic() - t0
    assert n > 5
    assert first_at is not None and first_at < total
    assert gen.result.completion_tokens == 32


def test_a_prompt_that_cannot_fit_is_refused_when_prepared(engine):
    req = chat("word " * 3000)
    with pytest.raises(ContextOverflow) as exc:
        prepared_tokens(engine, req)
    assert exc.value.prompt_tokens > engine.context_size
    assert prepared_tokens(engine, chat("hello")) > 0


def test_cancel_with_event_mid_stream(engine):
    cancel = threading.Event()
    gen = start(engine, chat("Write a long story about a dragon.", max_tokens=200), cancel)
    got = [next(gen)]
    cancel.set()
    got.extend(gen)
    assert gen.result.finish_reason == "cancelled"
    assert gen.result.completion_tokens < 200
    # the engine is free for the next request
    assert engine.generate(chat("Hi", max_tokens=4)).completion_tokens > 0


def test_sixteen_concurrent_threads_complete(engine):
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = engine.generate(chat(PROMPTS[i % 4] + f" ({i})", max_tokens=8))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert len(results) == 16
    assert all(r.completion_tokens > 0 for r in results.values())


def test_same_greedy_text_from_both_engines(llama_engine, batching_engine):
    for p in PROMPTS:
        req = chat(p, max_tokens=32)
        a = llama_engine.generate(req)
        b = batching_engine.generate(req)
        assert a.text == b.text, p
        assert (a.prompt_tokens, a.completion_tokens, a.finish_reason) == (
            b.prompt_tokens, b.completion_tokens, b.finish_reason)


def test_greedy_identical_alone_and_batched(batching_engine):
    assert_greedy_identical_alone_and_batched(batching_engine)


def test_flash_attention_serves_short_prompts_identically_alone_and_batched(fast_batching_engine):
    """The default mode (flash attention) promises no identical text, but short
    prompts (read in one chunk) keep it in practice: a regression guard."""
    assert_greedy_identical_alone_and_batched(fast_batching_engine)


def assert_greedy_identical_alone_and_batched(engine):
    reqs = [chat(p, max_tokens=24) for p in PROMPTS]
    alone = [engine.generate(r).text for r in reqs]
    assert all(alone)
    batched: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(reqs))

    def work(i: int) -> None:
        try:
            start.wait()
            batched[i] = engine.generate(reqs[i]).text
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [batched.get(i) for i in range(len(reqs))] == alone



# Longer than a prefill chunk: later chunks are decoded while others generate.
LONG_PROMPT = (
    "The API contract (endpoints, status codes, field names) is the one of the\n"
    "original design document, so its curl and Postman examples work unchanged.\n"
    "Beyond it: an OpenAI-compatible `/v1` API with streaming and API keys, Celery\n"
    "workers for async jobs, Swagger UI at `/docs` (`/openapi.json`), JSON logs,\n"
    "Prometheus `/metrics`, Docker Compose, and continuous batching of concurrent\n"
    "requests on one in-process model.\n\n"
    "The first `make run` builds llama-cpp-python from source (about 4 minutes on 2\n"
    "cores, portable CPU flags; pip caches the wheel afterwards) and prints the\n"
    "credentials of a first user, `demo`, once. Set `ADMIN_USERNAME` /\n"
    "`ADMIN_PASSWORD` to choose them. By default everything lives in a SQLite file\n"
    "under `instance/`; set `DATABASE_URL` to use PostgreSQL.\n\n"
    "Summarize the text above in one sentence."
)


def test_long_prompt_read_while_another_generates_gives_the_same_text(
        llama_engine, batching_engine):
    # A prompt chunk decoded in the same llama_decode as a generating sequence's
    # token was split by llama.cpp into a micro-batch with one token of each,
    # which computes that prompt token as a generated one: the text changed.
    req = chat(LONG_PROMPT, max_tokens=40)
    # longer than a chunk, even after a system prompt reused from an earlier request
    assert batching_engine.prepare(req).n_tokens > batching_engine.prefill_chunk + 64
    running = start(batching_engine, chat("Write a long story about a dragon.", max_tokens=400))
    next(running)  # generating until closed
    joined = batching_engine.generate(req)
    running.close()
    assert joined.text == llama_engine.generate(req).text


# -- slots, queueing, errors, edge cases ------------------------------------------

@pytest.mark.parametrize("temperature, response_format, chains", [
    (0.0, None, 0),  # the top logit, read in place
    (0.0, {"type": "json_object"}, 1),  # a grammar's masked draw needs one
    (0.8, None, 1),
])
def test_a_sampler_chain_is_built_only_when_a_draw_needs_one(tiny_engine, monkeypatch, temperature,
                                                             response_format, chains):
    import llama_cpp

    from model_api.engine import grammar

    built = []
    real = llama_cpp.llama_sampler_chain_init
    monkeypatch.setattr(llama_cpp, "llama_sampler_chain_init", lambda *a: built.append(1) or real(*a))
    fmt = grammar.canonical(response_format) if response_format else None
    res = tiny_engine.generate(chat("Hi", max_tokens=4, temperature=temperature, response_format=fmt))
    assert res.completion_tokens > 0 and len(built) == chains


@pytest.mark.parametrize("chunk, n_batch, expected", [(None, 512, 512), (100, 512, 100), (4096, 256, 256)])
def test_a_prompt_chunk_is_a_whole_batch_unless_set_smaller(chunk, n_batch, expected):
    # MODEL_PREFILL_CHUNK and a models file's prefill_chunk reach the engine through its settings
    from model_api.engine.registry import build_engine
    from model_api.settings import ModelSettings

    engine = build_engine(ModelSettings(prefill_chunk=chunk, n_batch=n_batch, n_parallel=1, n_ctx=256))
    try:
        assert engine.prefill_chunk == expected
    finally:
        engine.close()


def test_close_mid_stream_frees_the_slot(tiny_engine):
    gen = start(tiny_engine, chat("Write a long story about a dragon.", max_tokens=300))
    next(gen)
    gen.close()
    assert gen.result is not None and gen.result.finish_reason == "cancelled"
    # one slot only: this runs only if the cancelled sequence left it
    res = tiny_engine.generate(chat("Hi", max_tokens=4))
    assert res.completion_tokens > 0
    assert tiny_engine.stats()["active"] == 0


def test_engine_busy_when_queue_full(tiny_engine):
    long = chat("Write a long story about a dragon.", max_tokens=300)
    running = start(tiny_engine, long)
    next(running)  # admitted: the only slot is taken
    waiting = start(tiny_engine, long)  # the only queue place
    with pytest.raises(EngineBusy) as exc:
        start(tiny_engine, long)
    assert exc.value.retry_after >= 1
    running.close()
    waiting.close()
    assert tiny_engine.generate(chat("Hi", max_tokens=4)).completion_tokens > 0


def test_stream_rejects_overflowing_prompt(engine):
    with pytest.raises(ContextOverflow):
        start(engine, chat("word " * 3000))


def test_multibyte_text_split_across_tokens(llama_engine, batching_engine):
    # SmolLM2 spells each of these CJK characters with several byte tokens.
    req = chat("Translate 'good morning' into Chinese.", max_tokens=12)
    gen = start(batching_engine, req)
    deltas = list(gen)
    res = gen.result
    assert any(ord(c) > 127 for c in res.text)
    assert "\ufffd" not in res.text
    assert "".join(deltas) == res.text
    assert res.completion_tokens > len(res.text.strip())  # bytes really were split
    assert llama_engine.generate(req).text == res.text


# greedy picks the top logit itself (BatchingEngine._greedy); other temperatures draw with llama.cpp's sampler
@pytest.mark.parametrize("temperature, sampling_call", [(0.0, "llama_get_logits_ith"),
                                                        (0.8, "llama_sampler_sample")])
def test_scheduler_error_fails_the_request_not_the_engine(tiny_engine, monkeypatch, temperature, sampling_call):
    import llama_cpp

    from model_api.engine.base import EngineError

    real = getattr(llama_cpp, sampling_call)
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected sampler failure")
        return real(*args)

    monkeypatch.setattr(llama_cpp, sampling_call, flaky)
    with pytest.raises(EngineError):
        tiny_engine.generate(chat("Write a long story about a dragon.", max_tokens=10, temperature=temperature))
    assert calls["n"] == 3
    monkeypatch.setattr(llama_cpp, sampling_call, real)
    assert tiny_engine.generate(chat("Hi", max_tokens=4)).completion_tokens > 0
    assert tiny_engine.stats()["active"] == 0


def test_stop_string_ending_in_the_final_utf8_tail(tiny_engine):
    # A sequence ends while the UTF-8 decoder still holds the first bytes of a
    # character; they decode to U+FFFD only then, and that completes the stop
    # string: the matcher must see them too (as in LlamaEngine), not only flush.
    import codecs

    from model_api.engine.batching import _BatchGeneration, _Sequence
    from model_api.engine.stops import StopMatcher

    params = SamplingParams(stop=("b\ufffd",))
    seq = _Sequence(prompt=[0], params=params, cancel=threading.Event())
    seq.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    seq.stops = StopMatcher(params.stop)
    text = seq.stops.feed(seq.decoder.decode(b"ab" + "\u597d".encode()[:2]))
    assert text == "a"  # "b" is held back: it may start the stop string
    tiny_engine._emit(seq, text)
    tiny_engine._retire(seq, "length")  # never admitted: no slot to free
    gen = _BatchGeneration(tiny_engine, seq)
    assert list(gen) == ["a"]
    assert gen.result.text == "a"
    assert gen.result.finish_reason == "stop"



# -- prefix reuse: a slot keeps its last prompt's KV cells ------------------------

def prompt_tokens_of(engine, req: GenerationRequest) -> list[int]:
    return engine.prepare(req).tokens


def test_repeated_prompt_is_served_from_the_slot(tiny_engine, llama_engine):
    # With only its last prompt token decoded again (a one-token decode),
    # this prompt's greedy text changed after 4 tokens: two are decoded.
    req = chat("Name three colours.", max_tokens=24)
    first = tiny_engine.generate(req)
    second = tiny_engine.generate(req)
    assert second.text == first.text == llama_engine.generate(req).text
    assert second.prompt_tokens == first.prompt_tokens == tiny_engine.prepare(req).n_tokens
    # one slot: the second request finds its whole prompt there
    assert second.cached_tokens == second.prompt_tokens - 2
    assert first.cached_tokens < second.cached_tokens


def test_shared_prefix_is_reused_and_text_is_as_fresh(tiny_engine, llama_engine):
    from model_api.engine.batching import _common_prefix

    params = SamplingParams(temperature=0.0, max_tokens=16)
    system = {"role": "system", "content": "You are a terse assistant. Answer in one sentence."}
    q1 = {"role": "user", "content": "What is the capital of France?"}
    first = GenerationRequest.chat([system, q1], params)
    # a strict extension of the first prompt: the conversation goes on
    follow_up = GenerationRequest.chat(
        [system, q1, {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy?"}], params)
    # the same system prompt, another question
    other = GenerationRequest.chat(
        [system, {"role": "user", "content": "Name a large river in Africa."}], params)

    def run(req: GenerationRequest):
        held = tiny_engine._slot_prompts[0]  # one idle slot: what it holds
        prompt = prompt_tokens_of(tiny_engine, req)
        res = tiny_engine.generate(req)
        assert res.cached_tokens == _common_prefix(held, prompt)
        assert res.text == llama_engine.generate(req).text  # computed from scratch
        return res

    run(first)
    assert run(follow_up).cached_tokens == len(prompt_tokens_of(tiny_engine, first))
    res = run(other)  # the system turn and the start of the user turn
    assert 0 < res.cached_tokens < res.prompt_tokens - 2


def test_loading_the_batching_engine_does_not_silence_other_threads_logs():
    """llama-cpp-python's loaders point the process's fd 2 at /dev/null while they
    run; the server logs from other threads meanwhile (access lines of requests
    answered while the model loads), and none of those lines may be lost."""
    import subprocess
    import sys

    script = (
        "import sys, threading, time\n"
        "from model_api.engine.batching import BatchingEngine\n"
        "stop = threading.Event(); sent = 0\n"
        "def tick():\n"
        "    global sent\n"
        "    while not stop.is_set():\n"
        "        sys.stderr.write(f'tick {sent}\\n'); sys.stderr.flush(); sent += 1; time.sleep(0.0005)\n"
        "t = threading.Thread(target=tick); t.start()\n"
        "engine = BatchingEngine(n_parallel=2, n_ctx_per_seq=512)\n"
        "stop.set(); t.join(); engine.close()\n"
        "print(sent)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    sent = int(out.stdout.strip().splitlines()[-1])
    seen = sum(1 for line in out.stderr.splitlines() if line.startswith("tick "))
    assert sent > 0 and seen == sent
