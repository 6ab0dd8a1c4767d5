"""A remote backend: any OpenAI-compatible server (vLLM, llama-server, Ollama,
another instance of this service) behind the :class:`Engine` interface.

A streamed call is streamed from the upstream (``stream: true`` with
``stream_options.include_usage``) so deltas reach our clients as the upstream
produces them, and closing a generation closes the upstream connection, which
stops the upstream's work too. A call whose reply is read whole (a non-streamed
sync call) asks the upstream for one answer, as LiteLLM does: no event stream
to write and parse on either side, and a connection kept alive (llama-server
closes one after every stream): 0.6 ms less a call on this project's 2-core
machines (bench/RESULTS.md). Token counts come from the upstream's usage;
there is no local tokenizer, so :meth:`OpenAIEngine.prepare` is only a cheap
character-based guard and the upstream's own context errors become
:class:`ContextOverflow` (422).

Failures map to the engine errors the API already knows: unreachable or
misbehaving upstream → :class:`UpstreamError` (502), no answer in time →
:class:`UpstreamTimeout` (504), upstream 503 with ``Retry-After`` →
:class:`EngineBusy` (503).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import queue
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError
from urllib3.exceptions import TimeoutError as HTTPTimeout

from . import tools
from .base import (
    Completion,
    ContextOverflow,
    Engine,
    EngineBusy,
    EngineError,
    Generation,
    GenerationRequest,
    PreparedPrompt,
    UpstreamError,
    UpstreamTimeout,
    unicode_text,
)

#: a rough average for English text; only used for estimates stored before the upstream answers
CHARS_PER_TOKEN = 4
#: no tokenizer in use produces fewer tokens than one per this many characters, so a
#: prompt longer than context_size * this is certainly too long (cheap guard, no false 422s)
MAX_CHARS_PER_TOKEN = 8

_CONTEXT_HINTS = re.compile(r"context|too long|maximum.*length|prompt_too_long|exceeds", re.I)


def _message_of(body: Any, fallback: str) -> tuple[str, str | None, dict[str, Any]]:
    """(message, code, details) from an OpenAI-style (or our own) error body."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or fallback
            return str(msg), err.get("code") and str(err.get("code")), err.get("details") or {}
        if isinstance(err, str):
            return err, None, {}
    return fallback, None, {}


class OpenAIEngine(Engine):
    """Talks to ``{base_url}/chat/completions`` and ``{base_url}/completions``
    with urllib3. Not httpx, which the webhooks use: per streamed call httpx
    took 2.3 ms of CPU and urllib3 1.3 ms on this project's 2-core machines,
    where the gateway's CPU competes with the upstream's own (bench/RESULTS.md).
    As httpx did, it honours HTTP(S)_PROXY, ALL_PROXY and NO_PROXY and verifies TLS
    (:func:`_pool_manager`)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model_name: str | None = None,
        context_size: int = 2048,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
    ):
        self.base_url = base_url.rstrip("/")
        self._headers = {"Accept": "application/json, text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._post_headers = {**self._headers, "Content-Type": "application/json"}
        # read= bounds the wait for each chunk (the first token included), not the whole stream
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=timeout)
        self._http = _pool_manager(self.base_url, self._timeout)
        # the threads that read upstream streams (_RemoteGeneration), kept between calls:
        # starting a thread per call cost about a millisecond on a busy 2-core machine
        self._readers = ThreadPoolExecutor(max_workers=READER_THREADS, thread_name_prefix="upstream-stream")
        self._configured_model = model_name
        self._discovered_model: str | None = None
        self._discover_lock = threading.Lock()
        self._retry_discovery_at = 0.0
        self._closed = False
        self.context_size = context_size

    # --- naming -------------------------------------------------------------
    @property
    def model_name(self) -> str:  # type: ignore[override]
        """The configured MODEL_NAME, else the upstream's, else (upstream unreachable) a placeholder."""
        if self._configured_model or self._discovered_model:
            return self._configured_model or self._discovered_model  # type: ignore[return-value]
        if time.monotonic() >= self._retry_discovery_at:
            try:
                return self.upstream_model()
            except (UpstreamError, EngineBusy, ContextOverflow):
                # don't hammer a down upstream from every admission; calls will report it
                self._retry_discovery_at = time.monotonic() + 30
        return "remote"

    def upstream_model(self) -> str:
        """The model name to send upstream: MODEL_NAME, else the first one the upstream lists."""
        if self._configured_model:
            return self._configured_model
        with self._discover_lock:
            if self._discovered_model is None:
                with _mapped_errors(self.base_url):
                    resp = self._http.request("GET", self.url("models"), headers=self._headers,
                                              preload_content=False, retries=False, redirect=False)
                    try:
                        if resp.status >= 400:
                            raise _status_error(resp, self, 0)
                        listed = resp.read()
                    finally:
                        resp.release_conn()
                try:
                    self._discovered_model = str(json.loads(listed)["data"][0]["id"])
                except (ValueError, KeyError, IndexError, TypeError):
                    raise UpstreamError(f"{self.base_url}/models lists no model; set MODEL_NAME") from None
            return self._discovered_model

    # --- Engine -------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """No local tokenizer: an estimate (about 4 characters a token) that the
        upstream's usage replaces. Refuses only prompts that cannot fit whatever
        the tokenizer; the upstream checks the rest (its context error becomes
        ContextOverflow, refunded)."""
        chars = _prompt_chars(request)
        if chars // MAX_CHARS_PER_TOKEN + 1 > self.context_size:
            raise ContextOverflow(chars // MAX_CHARS_PER_TOKEN, self.context_size)
        return PreparedPrompt(request, max(1, math.ceil(chars / CHARS_PER_TOKEN)))

    def stream(self, prompt: PreparedPrompt, cancel: threading.Event | None = None, *,
               incremental: bool = True) -> Generation:
        if self._closed:
            raise EngineError(f"the {self.base_url} backend is closed")
        if not incremental and not isinstance(self._http, urllib3.ProxyManager):
            return _WholeAnswer(self, prompt, cancel)
        try:
            return _RemoteGeneration(self, prompt, cancel, incremental)
        except RuntimeError as exc:  # the reader pool was shut down meanwhile: this engine is closed
            raise EngineError(f"the {self.base_url} backend is closed") from exc

    def info(self) -> dict[str, Any]:
        return {**super().info(), "backend": "openai", "base_url": self.base_url}

    def close(self) -> None:
        # readers still queued run and fail on the closed client, so their callers hear of it
        self._closed = True
        self._readers.shutdown(wait=False)
        self._http.clear()

    # --- plumbing -----------------------------------------------------------
    def payload(self, request: GenerationRequest, *, incremental: bool = True) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of the upstream request: streamed, or for one whole answer."""
        p = request.params
        body: dict[str, Any] = {
            "model": self.upstream_model(),
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        if incremental:
            body.update(stream=True, stream_options={"include_usage": True})
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.response_format is not None:  # passed through as the client sent it
            spec = json.loads(p.response_format)
            if spec.get("type") == tools.KIND:
                body["tools"] = spec["tools"]
                if spec["tool_choice"] is not None:
                    body["tool_choice"] = spec["tool_choice"]
            else:
                body["response_format"] = spec
        if request.prompt is not None:
            return "completions", {**body, "prompt": request.prompt}
        return "chat/completions", {**body, "messages": [dict(m) for m in request.messages or ()]}

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def whole_answer_timeout(self, max_tokens: int) -> urllib3.Timeout:
        """A whole answer's first byte comes after its last token: it may take
        MODEL_TIMEOUT_SECONDS plus WHOLE_SECONDS_PER_TOKEN for each token asked for."""
        return urllib3.Timeout(connect=self._timeout.connect_timeout,
                               read=self._timeout.read_timeout + max_tokens * WHOLE_SECONDS_PER_TOKEN)

    @contextlib.contextmanager
    def post(self, path: str, body: dict[str, Any], timeout: urllib3.Timeout | None = None
             ) -> Iterator[urllib3.BaseHTTPResponse]:
        """POST and hand over the answer unread (``timeout``: the engine's, unless
        given); once more on a new connection when the upstream
        hung up before answering. A kept-alive connection from the pool may have been
        closed by the upstream a moment after it was checked (llama-server closes
        them after every stream, seen as "Remote end closed connection without
        response"): that is not the upstream failing, and the client should not get
        a 502 for it. A body left unread (the generation was closed) closes its
        connection, which is what stops the upstream's work."""
        payload = json.dumps(body).encode()
        for attempt in range(2):
            try:
                resp = self._http.urlopen("POST", self.url(path), body=payload, headers=self._post_headers,
                                          preload_content=False, retries=False, redirect=False,
                                          **({"timeout": timeout} if timeout is not None else {}))
            except ProtocolError:
                if attempt:
                    raise
                continue
            try:
                yield resp
            finally:
                if not resp.isclosed():
                    resp.close()
                resp.release_conn()
            return


def _pool_manager(base_url: str, timeout: urllib3.Timeout) -> urllib3.PoolManager:
    """Connections to the upstream, through the proxy the environment names for it,
    if any, and for https verified as httpx did: against SSL_CERT_FILE or
    SSL_CERT_DIR when set, else certifi's CA bundle."""
    url = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    proxy = None if urllib.request.proxy_bypass(url.hostname or "") else proxies.get(url.scheme) or proxies.get("all")
    kw: dict[str, Any] = dict(maxsize=POOL_CONNECTIONS, block=False, timeout=timeout, retries=False,
                              cert_reqs="CERT_REQUIRED")
    if os.environ.get("SSL_CERT_FILE"):
        kw["ca_certs"] = os.environ["SSL_CERT_FILE"]
    elif os.environ.get("SSL_CERT_DIR"):
        kw["ca_cert_dir"] = os.environ["SSL_CERT_DIR"]
    else:
        kw["ca_certs"] = certifi.where()
    return urllib3.ProxyManager(proxy, **kw) if proxy else urllib3.PoolManager(**kw)


def _lines(resp: urllib3.BaseHTTPResponse) -> Iterator[str]:
    """The body's lines as they arrive (``read1``: whatever the socket has, so an
    event is handed on at once, not when a buffer fills). A line longer than
    MAX_LINE_BYTES is an upstream failing, not one to hold in memory."""
    pending: list[bytes] = []  # the unfinished line's pieces: kept, not re-joined per chunk
    held = 0
    while chunk := resp.read1(65536):
        for piece in chunk.splitlines(keepends=True):
            if piece.endswith((b"\n", b"\r")):
                yield b"".join((*pending, piece)).rstrip(b"\r\n").decode("utf-8", "replace")
                pending, held = [], 0
                continue
            pending.append(piece)  # only a chunk's last piece can lack its line ending
            held += len(piece)
            if held > MAX_LINE_BYTES:
                raise UpstreamError(f"the upstream sent a line of over {MAX_LINE_BYTES} bytes")
    if pending:
        yield b"".join(pending).decode("utf-8", "replace")


def _prompt_chars(request: GenerationRequest) -> int:
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(str(m.get("content", ""))) + len(str(m.get("role", ""))) for m in request.messages or ())


class _mapped_errors:
    """Turn urllib3 failures into engine errors (a context manager so it also
    covers the body of a streaming response)."""

    def __init__(self, base_url: str):
        self.base_url = base_url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        # urllib3 makes a refused connection a kind of connect timeout: it is not one
        if isinstance(exc, HTTPTimeout) and not isinstance(exc, NewConnectionError):
            raise UpstreamTimeout(f"no answer from {self.base_url} in time ({type(exc).__name__})") from exc
        if isinstance(exc, HTTPError):
            raise UpstreamError(f"cannot talk to {self.base_url}: {type(exc).__name__}: {exc}") from exc
        return False


def _status_error(resp: urllib3.BaseHTTPResponse, engine: OpenAIEngine, prompt_estimate: int) -> Exception:
    """The engine error for a non-2xx upstream answer (reads the start of its body:
    enough for any error message, and all an upstream can make us hold)."""
    raw = resp.read(ERROR_BODY_BYTES)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    message, code, details = _message_of(body, raw[:300].decode("utf-8", "replace") or resp.reason or "")
    status = resp.status
    if status in (400, 413, 422) and (code in ("context_length_exceeded", "prompt_too_long")
                                      or _CONTEXT_HINTS.search(message)):
        exc = ContextOverflow(int(details.get("prompt_tokens") or prompt_estimate),
                              int(details.get("context_size") or engine.context_size))
        exc.args = (f"the model backend says the prompt does not fit: {message}",)
        return exc
    if status == 503 and resp.headers.get("Retry-After", "").isdigit():
        return EngineBusy(int(resp.headers["Retry-After"]))
    if status == 504:
        return UpstreamTimeout(f"{engine.base_url} answered 504: {message}")
    return UpstreamError(f"{engine.base_url} answered {status}: {message}")


_FINISH = {"stop": "stop", "length": "length"}


def _add_tool_call_delta(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Fold one streamed ``tool_calls`` delta, of an event :func:`_malformed` passed,
    into the calls so far (OpenAI sends a call's name once and its arguments in pieces)."""
    index = delta.get("index", 0) if isinstance(delta.get("index"), int) else 0
    call = calls.setdefault(index, {"type": "function", "function": {"name": "", "arguments": ""}})
    fn = delta.get("function") or {}
    if fn.get("name"):
        call["function"]["name"] = fn["name"]
    if fn.get("arguments"):
        call["function"]["arguments"] += fn["arguments"]


def _malformed(event: Any) -> str | None:
    """What is wrong with the shape of a stream event, in the fields we read (None:
    nothing). An upstream is not trusted to send what OpenAI's API says: a wrong
    type is an upstream error (502), not a crash of ours (500)."""
    if not isinstance(event, dict):
        return f"a {type(event).__name__} instead of an object"
    choices = event.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        return "its choices are not a list of objects"
    for choice in choices:
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict) or not isinstance(delta.get("tool_calls") or [], list):
            return "its delta is not an object with a list of tool calls"
        for tc in delta.get("tool_calls") or ():
            problem = _malformed_tool_call(tc)
            if problem:
                return problem
        text = _text_of(choice)
        if text and not isinstance(text, str):
            return f"its text is a {type(text).__name__}"
        if not isinstance(choice.get("finish_reason") or "", str):
            return "its finish_reason is not a string"
    if not isinstance(event.get("usage") or {}, dict):
        return "its usage is not an object"
    if not isinstance(event.get("model") or "", str):
        return "its model is not a string"
    return None


def _malformed_tool_call(tc: Any) -> str | None:
    """What is wrong with one streamed tool call delta (None: nothing): its name and
    arguments are joined into the call the client gets, so each must be text."""
    if not isinstance(tc, dict) or not isinstance(tc.get("function") or {}, dict):
        return "its tool call is not an object with a function object"
    fn = tc.get("function") or {}
    for field_ in ("name", "arguments"):
        if fn.get(field_) is not None and not isinstance(fn[field_], str):
            return f"its tool call's {field_} is a {type(fn[field_]).__name__}"
    return None


def _text_of(choice: dict[str, Any]) -> Any:
    """A choice's text: a chat chunk's delta content, or a completion chunk's text."""
    return (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")


def _count(value: Any) -> int | None:
    """A token count an upstream reported, if it is one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _stream_events(resp: urllib3.BaseHTTPResponse, base_url: str) -> Iterator[Any]:
    """An event stream's events, parsed, and None for each line that carries none
    (comments, keep-alives: the reader checks for a cancellation at every line)."""
    done = False  # [DONE] came
    for line in _lines(resp):
        if done or not line.startswith("data:"):
            yield None  # comments, event names, keep-alives
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            # read on to the body's end, which is here: leaving a body unread
            # closes its connection, and the next call had to open a new one
            done = True
            yield None
            continue
        try:
            yield json.loads(data)
        except ValueError:
            raise UpstreamError(f"{base_url} sent a malformed event: {data[:100]!r}") from None


def _whole_answer(resp: urllib3.BaseHTTPResponse, base_url: str) -> Iterator[Any]:
    """A whole (non-streamed) answer as the one stream event it amounts to: each
    choice's ``message`` becomes its ``delta``, and its tool calls are numbered as
    a stream numbers them, so that one reading serves both."""
    raw = resp.read(MAX_LINE_BYTES + 1)
    if len(raw) > MAX_LINE_BYTES:
        raise UpstreamError(f"the upstream sent an answer of over {MAX_LINE_BYTES} bytes")
    try:
        answer = json.loads(raw)
    except ValueError:
        raise UpstreamError(f"{base_url} sent a malformed answer: {raw[:100]!r}") from None
    if isinstance(answer, dict) and isinstance(answer.get("choices"), list):
        answer = {**answer, "choices": [_as_delta(c) for c in answer["choices"]]}
    yield answer


def _as_delta(choice: Any) -> Any:
    """A whole answer's choice in a stream event's shape (anything else as it is, for
    :func:`_malformed` to name)."""
    if not isinstance(choice, dict) or "message" not in choice:
        return choice
    out = {k: v for k, v in choice.items() if k != "message"}
    delta = choice["message"]
    if isinstance(delta, dict) and isinstance(delta.get("tool_calls"), list):
        delta = {**delta, "tool_calls": [{"index": i, **tc} if isinstance(tc, dict) else tc
                                         for i, tc in enumerate(delta["tool_calls"])]}
    return {**out, "delta": delta}


#: what the reader thread hands the caller (see _RemoteGeneration)
_PIECE, _END, _FAIL = 0, 1, 2
#: longest wait in close() for the reader to stop; it stops at the upstream's next line
CLOSE_WAIT_SECONDS = 5.0
#: streams one engine reads at once; more wait for a reader (a gunicorn worker serves far fewer)
READER_THREADS = 256
#: the longest event line read from an upstream (a whole reply fits in one line many times over)
MAX_LINE_BYTES = 16 * 1024 * 1024
#: a whole answer's wait beyond MODEL_TIMEOUT_SECONDS, per token asked for: 4 tokens a second,
#: the slowest decode the web server's timeouts plan for (gunicorn_conf, WEB_MIN_TOKENS_PER_SECOND)
WHOLE_SECONDS_PER_TOKEN = 0.25
#: how much of an upstream's error answer is read for its message
ERROR_BODY_BYTES = 64 * 1024
#: kept-alive connections to the upstream: one per reader, so no stream ever waits for a
#: connection and none is closed for want of room in the pool (urllib3 warns each time)
POOL_CONNECTIONS = READER_THREADS


class _RemoteGeneration(Generation):
    """The upstream request starts when the generation is made, as a local
    engine's does: a thread sends it and reads the stream into a queue. So the
    caller's database work (reserving the unit, writing the call row) overlaps
    the upstream's time to first token instead of preceding it (the gateway's
    own time per call went from 8.2 to 6.3 ms p50: bench/RESULTS.md)."""

    def __init__(self, engine: OpenAIEngine, prompt: PreparedPrompt, cancel: threading.Event | None,
                 incremental: bool):
        self._begin(engine, prompt, cancel, incremental)
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._reader = engine._readers.submit(self._read)

    def _begin(self, engine: OpenAIEngine, prompt: PreparedPrompt, cancel: threading.Event | None,
               incremental: bool) -> None:
        self._engine = engine
        self._request = prompt.request
        self._incremental = incremental
        self._estimate = prompt.n_tokens
        self._cancel = cancel or threading.Event()
        self._done = False
        self.result = None

    def _read(self) -> None:
        try:
            for piece in self._run():
                self._out.put((_PIECE, piece))
        except BaseException as exc:  # handed to the caller, raised from __next__
            self._out.put((_FAIL, exc))
            return
        self._out.put((_END, None))

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        kind, value = self._out.get()
        if kind == _PIECE:
            return value
        self._done = True
        if kind == _END:
            raise StopIteration
        raise value

    def close(self) -> None:
        """Stop reading: the reader leaves the stream at the upstream's next line,
        which closes the upstream connection and so stops the upstream's work.
        Waits for that (bounded), so ``result`` holds what was produced.

        A whole answer's request cannot be stopped this way (nothing comes before
        the answer): closing returns at once, the upstream finishes its work, and
        the reader drops the answer (a sync call that lost the race for its last
        quota unit, or whose row could not be written)."""
        self._cancel.set()
        self._done = True
        if not self._incremental:
            return
        try:
            self._reader.result(CLOSE_WAIT_SECONDS)
        except (FutureTimeout, CancelledError):
            pass  # still waiting for the upstream's next line, or never started

    def _send(self) -> tuple[str, contextlib.AbstractContextManager[urllib3.BaseHTTPResponse] | None]:
        """(the model asked for, the upstream's answer to come); no answer when the
        generation was closed before its request went out, which is then not sent."""
        path, body = self._engine.payload(self._request, incremental=self._incremental)
        if self._cancel.is_set():
            return body["model"], None
        timeout = None if self._incremental else self._engine.whole_answer_timeout(self._request.params.max_tokens)
        return body["model"], self._post(path, body, timeout)

    def _post(self, path: str, body: dict[str, Any],
              timeout: urllib3.Timeout | None) -> contextlib.AbstractContextManager[urllib3.BaseHTTPResponse]:
        return self._engine.post(path, body, timeout)

    def _run(self) -> Iterator[str]:
        eng = self._engine
        estimate = self._estimate
        start = time.perf_counter()
        ttft: float | None = None
        pieces: list[str] = []
        calls: dict[int, dict[str, Any]] = {}  # tool calls streamed in parts, by index
        finish = "stop"
        usage: dict[str, Any] = {}
        model = eng.model_name
        with _mapped_errors(eng.base_url):
            model, answer = self._send()
            if answer is None:  # closed before the request went out: not sent
                finish = "cancelled"
            else:
                with answer as resp:
                    if resp.status >= 400:
                        raise _status_error(resp, eng, estimate)
                    # an upstream may stream though asked for one answer: its events are read as such
                    streamed = self._incremental or resp.headers.get("Content-Type", "").startswith(
                        "text/event-stream")
                    for chunk in (_stream_events if streamed else _whole_answer)(resp, eng.base_url):
                        if self._cancel.is_set():
                            finish = "cancelled"
                            break
                        if chunk is None:
                            continue
                        problem = _malformed(chunk)
                        if problem:
                            what = "event" if streamed else "answer"
                            raise UpstreamError(f"{eng.base_url} sent a malformed {what}: {problem}")
                        if "error" in chunk:
                            failed = "failed mid-stream" if streamed else "answered an error"
                            raise UpstreamError(f"{eng.base_url} {failed}: {_message_of(chunk, 'unknown error')[0]}")
                        model = chunk.get("model") or model
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for choice in chunk.get("choices") or ():
                            delta = choice.get("delta") or {}
                            for tc in delta.get("tool_calls") or ():
                                _add_tool_call_delta(calls, tc)
                            piece = _text_of(choice)
                            if piece:
                                piece = unicode_text(piece)
                                if ttft is None:
                                    ttft = time.perf_counter() - start
                                pieces.append(piece)
                                yield piece
                            if choice.get("finish_reason"):
                                finish = _FINISH.get(choice["finish_reason"], "stop")
        if calls and finish != "cancelled":
            # the upstream's calls, in the text form every engine uses (engine/tools.py)
            pieces.append(unicode_text(tools.calls_text([calls[i] for i in sorted(calls)])))
            ttft = ttft if ttft is not None else time.perf_counter() - start
            yield pieces[-1]
        text = "".join(pieces)
        self.result = Completion(
            text=text,
            # without usage (an upstream ignoring stream_options) these are estimates
            prompt_tokens=_count(usage.get("prompt_tokens")) or estimate,
            completion_tokens=_count(usage.get("completion_tokens")) or len(pieces),
            finish_reason=finish,
            model=model,
            time_to_first_token=ttft,
            generation_seconds=time.perf_counter() - start,
        )


class _WholeAnswer(_RemoteGeneration):
    """A whole answer (a non-streamed sync call), without a reader thread: the
    request is written by the caller's thread when the generation is made, the
    caller's database work runs while the upstream computes, and the same thread
    reads the answer at the first ``next()``. Handing the request to a reader and
    the answer back cost two thread wake-ups and a fight for the GIL with that
    database work, on the call's critical path: 0.5-0.8 ms of a gateway call's
    p50 on this project's 2-core machines (bench/RESULTS.md). Through a proxy a
    whole answer is still read by a reader thread (:class:`_RemoteGeneration`),
    as urllib3's proxy handling lives in its urlopen.

    A failure to send is raised at the first ``next()``, as a reader's is, so the
    caller records the call's failure the same way. Closing before the answer is
    read closes the connection, which is all an upstream can hear of it."""

    def __init__(self, engine: OpenAIEngine, prompt: PreparedPrompt, cancel: threading.Event | None):
        self._begin(engine, prompt, cancel, incremental=False)
        self._exchange: _Exchange | None = None
        self._sent: tuple[str, contextlib.AbstractContextManager[urllib3.BaseHTTPResponse] | None] | Exception
        try:
            with _mapped_errors(engine.base_url):
                self._sent = super()._send()  # written now, through _post below
        except Exception as exc:  # raised from the first next(), inside the caller's failure handling
            self._sent = exc
        self._pieces = self._run()

    def _post(self, path: str, body: dict[str, Any],
              timeout: urllib3.Timeout | None) -> contextlib.AbstractContextManager[urllib3.BaseHTTPResponse]:
        assert timeout is not None  # a whole answer always has one (whole_answer_timeout)
        self._exchange = _Exchange(self._engine, path, body, timeout)
        return self._exchange.answer()  # nothing is read until it is entered, at the first next()

    def _send(self) -> tuple[str, contextlib.AbstractContextManager[urllib3.BaseHTTPResponse] | None]:
        if isinstance(self._sent, Exception):
            raise self._sent
        return self._sent

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            return next(self._pieces)
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        self._cancel.set()
        self._done = True
        self._pieces.close()
        if self._exchange is not None:
            self._exchange.abandon()


class _Exchange:
    """One POST written now on a connection from the engine's pool, its answer
    read later by the same thread (:class:`_WholeAnswer`). urllib3's ``urlopen``
    writes and reads in one call; this is the same pair of steps apart, with its
    connection taken from and given back to the pool by the pool's own
    ``_get_conn``/``_put_conn`` (private, unchanged since urllib3 1.x; urllib3 is
    pinned, and tests/engine_remote runs both steps against real sockets). As
    :meth:`OpenAIEngine.post` does, an answer the upstream never gave on a
    kept-alive connection it had closed is asked for once more on a new one."""

    def __init__(self, engine: OpenAIEngine, path: str, body: dict[str, Any], timeout: urllib3.Timeout):
        url = engine.url(path)
        self._pool = engine._http.connection_from_url(url)
        parts = urlsplit(url)
        self._target = parts.path + (f"?{parts.query}" if parts.query else "")
        self._payload = json.dumps(body).encode()
        self._headers = engine._post_headers
        self._timeout = timeout
        self._conn: Any = self._pool._get_conn()
        self._write()

    def _write(self) -> None:
        conn = self._conn
        conn.timeout = self._timeout.connect_timeout
        try:
            conn.request("POST", self._target, body=self._payload, headers=self._headers, preload_content=False)
        except BrokenPipeError:
            pass  # a kept-alive connection the upstream closed: reading finds out, and asks again
        except HTTPError:  # could not connect (urllib3's own errors)
            self.abandon()
            raise
        except OSError as exc:
            self.abandon()
            raise ProtocolError("could not send the request", exc) from exc

    def _read(self) -> urllib3.BaseHTTPResponse:
        self._conn.timeout = self._timeout.read_timeout
        try:
            return self._conn.getresponse()
        except TimeoutError as exc:  # as urllib3 names it, for _mapped_errors
            raise ReadTimeoutError(self._pool, self._target, f"read timed out ({exc})") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ProtocolError("the upstream's answer could not be read", exc) from exc

    @contextlib.contextmanager
    def answer(self) -> Iterator[urllib3.BaseHTTPResponse]:
        """The upstream's answer, unread; the connection goes back to the pool after."""
        try:
            try:
                resp = self._read()
            except ProtocolError as exc:
                if not isinstance(exc.__cause__, ConnectionError):  # hung up without answering
                    raise
                self._conn.close()  # the same connection object opens a new one when written to
                self._write()
                resp = self._read()
            try:
                yield resp
            finally:
                if not resp.isclosed():  # a body left unread: the connection cannot carry another request
                    self._conn.close()
        except BaseException:
            self.abandon()
            raise
        finally:
            self._release()

    def abandon(self) -> None:
        """Close the connection without reading (the upstream hears that much)."""
        if self._conn is not None:
            self._conn.close()
            self._release()

    def _release(self) -> None:
        if self._conn is not None:
            self._pool._put_conn(self._conn)  # a closed one too: it opens a new connection when next used
            self._conn = None
