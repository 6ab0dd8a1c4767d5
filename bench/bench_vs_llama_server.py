"""This service against llama.cpp's own llama-server on the same machine and model.

    .venv/bin/python bench/bench_vs_llama_server.py [--rounds 2] [--levels 1,8,16] [--quick]
        [--skip-throughput] [--gateway-base CHECKOUT]

What a user would run instead of us: ``llama-server`` built natively
(``GGML_NATIVE=ON``) from the llama.cpp that the pinned llama-cpp-python
vendors, serving the same GGUF with ``-np 8 -t <cores> -c 16384``; on a CPU
that advertises AMX, where the native build dies in its first matmul, with
every other extension the CPU has (``native-no-amx``). It is built once into
~/.cache/model-api/llama-server-<version>[-native-no-amx] (outside the repo)
from the sdist that ``pip download`` fetches.

1. Throughput: our ``make run`` defaults (gunicorn, SQLite, the batching engine)
   and llama-server side by side, both on ``/v1/chat/completions`` with
   streaming, temperature 0, each warmed up by one short request, interleaved
   (A B, then B A in the next round) at each level of users, two workloads:
     chat    short prompt, 128 tokens out, 2 requests per user
     prompt  ~1,000-token prompt (unique per request), 16 tokens out, 2 per user
   One user is interleaved request by request instead (A B B A ..., 8 requests
   a side a round, ``--single-user-requests``): a block of two single requests
   is over in seconds, and on a shared machine the speed of such a short
   window moved by 10 % between rounds.
   Per side: tokens/s (chat: completion tokens; prompt: prompt + completion
   tokens, per wall second), time to first token p50/p99; and our ratio.
2. Gateway: 1-token calls to llama-server directly, through us with
   ``MODEL_BACKEND=openai`` in front of it, and through LiteLLM Proxy (in its
   own venv, ~/.cache/model-api/litellm-venv) in front of it, interleaved one
   call each in turn, client-side; added p50/p99 over direct. Plus our local
   engine's server-side gateway time (request latency minus model time, from
   the access log). ``--gateway-base ../other-checkout`` puts another tree's
   gateway into the same interleaved calls (an A/B of a change).

Writes bench/out/vs_llama_server.json and bench/vs_llama_server.png (matplotlib
from bench/requirements.txt; an ASCII chart is printed either way). The
machine is shared: read the ratios of one run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
OUT = ROOT / "bench" / "out"
CACHE = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "model-api"))
LITELLM = "litellm[proxy]==1.108.7"  # the version measured
USER, PASSWORD = "bench", "bench password 123"
CHAT_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
FILLER = (
    "The lighthouse stood on a rock at the edge of the bay, and every night its keeper climbed the spiral "
    "stairs to light the lamp, wind the clockwork and polish the great lens until it shone. Ships passed "
    "far out at sea, their lights moving slowly against the dark, and the keeper wrote each one in a book. "
)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = max(0, min(len(values) - 1, round(q / 100 * (len(values) - 1))))
    return values[k]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arm(text: str, keys: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    """A benchmark's ``--arm NAME[:key=value,...]``: its name and options. A key
    must be one of ``keys`` or an upper-case environment variable; anything else
    (a misspelt ``varient=icelake``) is refused, not ignored, for an ignored key
    would run the default arm under that arm's name. For argparse's ``type=``."""
    name, _, rest = text.partition(":")
    pairs = [kv.partition("=") for kv in rest.split(",") if kv]
    unknown = [k for k, eq, _ in pairs if not eq or not (k in keys or k.isupper())]
    if not name or unknown:
        allowed = " or ".join(filter(None, (", ".join(keys), "upper-case environment variables")))
        raise argparse.ArgumentTypeError(f"{text!r}: an arm is NAME[:key=value,...], its keys {allowed}; "
                                         f"not {', '.join(unknown) or 'an empty name'}")
    return name, {k: v for k, _, v in pairs}


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def wait_ready(url: str, proc: subprocess.Popen, what: str, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {OUT}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {seconds:.0f} s")


# ---------------------------------------------------------------- llama-server
def llama_cpp_version() -> str:
    pinned = re.search(r"^llama[-_]cpp[-_]python==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M | re.I)
    assert pinned, "requirements.txt pins llama-cpp-python"
    return pinned.group(1)


#: /proc/cpuinfo flag -> llama.cpp's option, for a build of every extension the CPU has but AMX
X86_OPTIONS = {"sse4_2": "SSE42", "f16c": "F16C", "fma": "FMA", "bmi2": "BMI2", "avx": "AVX", "avx2": "AVX2",
               "avx_vnni": "AVX_VNNI", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI",
               "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16"}


def cpu_build_flags() -> tuple[str, list[str]]:
    """(name, cmake flags) of the fastest llama-server build that runs here: native,
    except on CPUs that advertise AMX. There the native build dies in its first
    matmul (SIGILL on ``tilezero`` in ``tinygemm_kernel_amx`` on this project's
    Sapphire Rapids VMs, whose hypervisor does not enable the AMX state), so a
    user gets every other extension the CPU has, named one by one."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        flags = set()
    if "amx_tile" not in flags:
        return "native", ["-DGGML_NATIVE=ON"]
    return "native-no-amx", ["-DGGML_NATIVE=OFF", *(f"-DGGML_{opt}=ON" for flag, opt in X86_OPTIONS.items()
                                                   if flag in flags)]


def llama_server_binary(version: str) -> Path:
    """llama-server from the vendored llama.cpp of llama-cpp-python ``version``,
    built for this CPU (:func:`cpu_build_flags`) and statically once, then reused.
    The build directory is kept beside it, so an interrupted build resumes where it stopped."""
    name, cpu_flags = cpu_build_flags()
    home = CACHE / (f"llama-server-{version}" + ("" if name == "native" else f"-{name}"))
    binary = home / "llama-server"
    if binary.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    src = home / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    print(f"building llama-server {version} ({name}) into {home} (minutes, once)", flush=True)
    if not src.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama_cpp_python=={version}", "-d", tmp], check=True)
            with tarfile.open(next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))) as tar:
                tar.extractall(home, filter="data")
    build = home / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    *cpu_flags, "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.copy2(build / "bin" / "llama-server", binary)
    return binary


class LlamaServer:
    def __init__(self, binary: Path, model: str, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(binary), "-m", model, "-np", "8", "-t", str(threads), "-c", "16384",
                    "--host", "127.0.0.1", "--port", str(self.port)]

    def __enter__(self):
        self.log = open(OUT / "llama-server.log", "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_ready(self.url + "/health", self.proc, "llama-server")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)


# ---------------------------------------------------------------- this service
class Ours:
    """gunicorn as ``make run`` starts it (its defaults; a SQLite file), plus ``env``;
    from this checkout, or from the checkout at ``root`` (an A/B of two trees)."""

    def __init__(self, name: str, env: dict[str, str] | None = None, root: Path = ROOT):
        self.name = name
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix=f"bench-{name}-")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "DATABASE_URL", "WEB_"))},
            "PYTHONPATH": str(root / "src"),
            "INSTANCE_DIR": self.tmp,
            "DATABASE_URL": f"sqlite:///{self.tmp}/model_api.sqlite3",
            "BIND": f"127.0.0.1:{self.port}",
            **(env or {}),
        }
        self.log_path = OUT / f"ours-{name}.log"

    def __enter__(self):
        cli = [sys.executable, "-m", "model_api.entry"]
        subprocess.run(cli + ["db", "upgrade"], env=self.env, check=True, capture_output=True)
        subprocess.run(cli + ["users", "create", USER, "--password-stdin", "--quota", "100000000"],
                       input=PASSWORD + "\n", env=self.env, text=True, check=True, capture_output=True)
        out = subprocess.run(cli + ["keys", "create", USER], env=self.env, text=True, check=True,
                             capture_output=True).stdout
        self.key = out.split()[0]  # the key alone on the first line
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:model_api.gunicorn_conf", "model_api.wsgi:app"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root)
        wait_ready(self.url + "/ready", self.proc, f"our server ({self.name})")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)
        shutil.rmtree(self.tmp, ignore_errors=True)


class LiteLLM:
    """LiteLLM Proxy (master key only, no database) in front of ``upstream``."""

    def __init__(self, upstream: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "sk-bench-master"
        self.upstream = upstream

    def __enter__(self):
        venv = CACHE / "litellm-venv"
        if not (venv / "bin" / "litellm").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", LITELLM], check=True)
        cfg = OUT / "litellm.yaml"
        cfg.write_text(
            "model_list:\n  - model_name: smol\n    litellm_params:\n      model: openai/smol\n"
            f"      api_base: {self.upstream}/v1\n      api_key: none\n"
            f"general_settings:\n  master_key: {self.key}\n")
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        self.log = open(OUT / "litellm.log", "wb")
        self.proc = subprocess.Popen([str(venv / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--num_workers", "1"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_ready(self.url + "/health/liveliness", self.proc, "LiteLLM Proxy")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)


# ---------------------------------------------------------------- the client
def stream_chat(session: requests.Session, url: str, key: str | None, content: str, max_tokens: int,
                request_id: str | None = None, token_times: list[float] | None = None,
                system: str | None = None) -> dict:
    """One streamed chat completion: time to first token, total time, token counts;
    ``token_times`` gets the clock reading of each content event; ``system``: a
    system message before the user's."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if request_id:
        headers["X-Request-ID"] = request_id
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body = {"model": "smol", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage, timings = None, 0, None, {}
    try:
        r = session.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=600)
    except requests.ConnectionError:
        # llama-server closes a keep-alive connection idle for 5 s; the session reused
        # it after the other side's turn: once more, on a new connection
        t0 = time.perf_counter()
        r = session.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=600)
    with r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("timings"):  # llama-server's own account of the request
                timings = event["timings"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if token_times is not None:
                        token_times.append(time.perf_counter())
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    usage = usage or {}
    return {"ttft": ttft if ttft is not None else total, "seconds": total,
            "completion_tokens": usage.get("completion_tokens", chunks),
            "prompt_tokens": usage.get("prompt_tokens", 0), "timings": timings}


def prompt_for(workload: str, user: int, j: int, salt: str) -> str:
    if workload == "chat":
        return f"{CHAT_PROMPT} ({salt} {user}-{j})"
    # a unique first line, so no server can reuse another request's prompt cache; the salt
    # names the round, the side and the level: llama-server keeps earlier prompts in RAM
    # (--cache-ram, 8 GiB), so a prompt repeated from an earlier level would be free there
    return f"Note {salt}-{user}-{j}.\n" + FILLER * 15 + "\nSummarise the notes above in one sentence."


WORKLOADS = {"chat": 128, "prompt": 16}


def run_in_process(engine, workload: str, users: int, per_user: int, salt: str,
                   max_tokens: int | None = None) -> tuple[float, int, int]:
    """A workload through an engine in this process (no HTTP), ``users`` closed-loop
    clients of ``per_user`` greedy requests each, the prompts :func:`prompt_for`
    gives: wall seconds, prompt tokens and generated tokens. What the in-process
    benches (bench_passes.py, bench_ab_engine.py) measure; ``max_tokens``
    overrides the workload's reply length."""
    from model_api.engine.base import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens or WORKLOADS[workload], temperature=0.0)
    results = []  # list.append is atomic: the client threads share it without a lock

    def user(u: int) -> None:
        for j in range(per_user):
            text = prompt_for(workload, u, j, salt)
            results.append(engine.generate(GenerationRequest.chat([{"role": "user", "content": text}], params)))

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return wall, sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)


def run_level(url: str, key: str | None, workload: str, users: int, per_user: int, salt: str) -> dict:
    max_tokens = WORKLOADS[workload]

    def user_loop(i: int) -> list[dict]:
        s = requests.Session()
        return [stream_chat(s, url, key, prompt_for(workload, i, j, salt), max_tokens) for j in range(per_user)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        results = [r for batch in pool.map(user_loop, range(users)) for r in batch]
    return summary(workload, results, time.perf_counter() - t0)


def run_single_user(sides: list[tuple[str, str, str | None]], workload: str, per_side: int,
                    salt: str) -> dict[str, dict]:
    """One user, the sides taking turns request by request (A B, B A, ...), so that
    a slower or faster minute of a shared machine falls on both alike; per side, as
    :func:`run_level` reports it (the wall time: its requests' own)."""
    sessions = {name: requests.Session() for name, _, _ in sides}
    results: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    for j in range(per_side):
        for name, url, key in (sides if j % 2 == 0 else sides[::-1]):
            results[name].append(stream_chat(sessions[name], url, key,
                                             prompt_for(workload, 0, j, f"{salt}{name[0]}"), WORKLOADS[workload]))
    return {name: summary(workload, rs, sum(r["seconds"] for r in rs)) for name, rs in results.items()}


def summary(workload: str, results: list[dict], wall: float) -> dict:
    """A level's numbers from its requests and the wall time they took."""
    out_tokens = sum(r["completion_tokens"] for r in results)
    all_tokens = out_tokens + sum(r["prompt_tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    return {"tok_s": (out_tokens if workload == "chat" else all_tokens) / wall, "out_tok_s": out_tokens / wall,
            "ttft_p50_ms": pct(ttft, 50) * 1000, "ttft_p99_ms": pct(ttft, 99) * 1000,
            "latency_p50_ms": pct([r["seconds"] for r in results], 50) * 1000,
            "requests": len(results), "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in results),
            "wall_s": wall, "load": load()}


def throughput(ls: LlamaServer, ours: Ours, levels: list[int], rounds: int, per_user: int,
               workloads: list[str], single_user: int = 8) -> list[dict]:
    """``per_user``: requests per user per round; ``single_user``: requests a side a
    round at one user (taking turns, :func:`run_single_user`)."""
    rows = []
    # one short request each first, so that neither side's first-request costs (lazy imports,
    # the first graph allocations, cold caches) land in the first level measured
    for url, key in ((ls.url, None), (ours.url, ours.key)):
        run_level(url, key, "chat", 1, 1, "warm-up")
    for workload in workloads:
        for users in levels:
            runs: dict[str, list[dict]] = {"llama-server": [], "ours": []}
            for rnd in range(rounds):
                sides = [("llama-server", ls.url, None), ("ours", ours.url, ours.key)]
                if rnd % 2:
                    sides.reverse()
                if users == 1:
                    done = run_single_user(sides, workload, single_user, f"r{rnd}u1")
                else:
                    done = {name: run_level(url, key, workload, users, per_user, f"r{rnd}{name[0]}u{users}")
                            for name, url, key in sides}
                for name, res in done.items():
                    runs[name].append(res)
                    print(f"  {workload:6} {users:2} users  {name:12} {res['tok_s']:7.1f} tok/s  "
                          f"TTFT p50 {res['ttft_p50_ms']:6.0f} ms p99 {res['ttft_p99_ms']:6.0f} ms  "
                          f"latency p50 {res['latency_p50_ms']:6.0f} ms  "
                          f"(load {res['load']})", flush=True)
            row = {"workload": workload, "users": users}
            for name, rs in runs.items():
                row[name] = {
                    "tok_s": statistics.median(r["tok_s"] for r in rs),
                    "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in rs),
                    "ttft_p99_ms": statistics.median(r["ttft_p99_ms"] for r in rs),
                    "latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in rs),
                    "runs": rs,
                }
            row["ratio"] = row["ours"]["tok_s"] / row["llama-server"]["tok_s"]
            row["ttft_ratio"] = row["ours"]["ttft_p50_ms"] / row["llama-server"]["ttft_p50_ms"]
            rows.append(row)
    return rows


def one_token(session: requests.Session, url: str, key: str | None) -> float:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    r = session.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt


def in_turn(sides: list, i: int) -> list:
    """Round ``i``'s order of the sides: each first in turn, so that none always
    follows the same one (a call right after another one's may be slower or faster)."""
    k = i % len(sides)
    return sides[k:] + sides[:k]


def gateway(ls: LlamaServer, calls: int, base: Path | None = None) -> dict:
    """With ``base`` (another checkout), its gateway joins the same interleaved
    calls as ``ours-base``: an A/B of two trees against the same upstream."""
    remote = {"MODEL_BACKEND": "openai", "MODEL_BASE_URL": ls.url + "/v1"}
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(Ours("gateway", remote))
        lite = stack.enter_context(LiteLLM(ls.url))
        targets = {"direct": (ls.url, None), "ours": (proxy.url, proxy.key), "litellm": (lite.url, lite.key)}
        if base is not None:
            old = stack.enter_context(Ours("gateway-base", remote, root=base))
            targets["ours-base"] = (old.url, old.key)
        sessions = {name: requests.Session() for name in targets}
        for name, (url, key) in targets.items():  # warm: connections, caches
            for _ in range(5):
                one_token(sessions[name], url, key)
        lat: dict[str, list[float]] = {name: [] for name in targets}
        for i in range(calls):
            for name, (url, key) in in_turn(list(targets.items()), i):
                lat[name].append(one_token(sessions[name], url, key) * 1000)
    base50, base99 = pct(lat["direct"], 50), pct(lat["direct"], 99)
    out = {name: {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99)} for name, v in lat.items()}
    for name in targets.keys() - {"direct"}:
        out[name]["added_p50_ms"] = out[name]["p50_ms"] - base50
        out[name]["added_p99_ms"] = out[name]["p99_ms"] - base99
    out["ours_vs_litellm_added_p50"] = out["ours"]["added_p50_ms"] / out["litellm"]["added_p50_ms"]
    if base is not None:
        out["ours_vs_base_added_p50"] = out["ours"]["added_p50_ms"] / out["ours-base"]["added_p50_ms"]
    out["calls"], out["load"] = calls, load()
    return out


def local_gateway(ours: Ours, calls: int) -> dict:
    """Server-side: request latency minus model time, for 1-token calls to the local engine."""
    s = requests.Session()
    for i in range(calls):
        stream_chat(s, ours.url, ours.key, "Hi", 1, request_id=f"gw-{i}")
    time.sleep(0.5)  # the access log line of a stream is written when it closes
    ms = []
    for line in ours.log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if str(rec.get("request_id", "")).startswith("gw-") and "model_seconds" in rec:
            ms.append(rec["latency_ms"] - rec["model_seconds"] * 1000)
    return {"p50_ms": pct(ms[5:], 50), "p99_ms": pct(ms[5:], 99), "calls": len(ms), "load": load()}


# ---------------------------------------------------------------- report
def ascii_chart(rows: list[dict]) -> str:
    lines = []
    top = max(max(r["llama-server"]["tok_s"], r["ours"]["tok_s"]) for r in rows)
    for r in rows:
        for name in ("llama-server", "ours"):
            v = r[name]["tok_s"]
            lines.append(f"{r['workload']:6} {r['users']:2}u {name:12} {'#' * round(40 * v / top):40} {v:7.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]  # --workloads may leave one out
    fig, axes = plt.subplots(1, len(measured), figsize=(5 * len(measured), 4), squeeze=False)
    for ax, workload in zip(axes[0], measured):
        rs = [r for r in rows if r["workload"] == workload]
        x = range(len(rs))
        for k, name in enumerate(("llama-server", "ours")):
            bars = ax.bar([i + 0.4 * k for i in x], [r[name]["tok_s"] for r in rs], width=0.4, label=name)
            if name == "ours":  # our ratio over each pair
                ax.bar_label(bars, [f"{r['ratio']:.2f}×" for r in rs], padding=2)
        ax.set_xticks([i + 0.2 for i in x], [f"{r['users']} users" for r in rs])
        ax.set_title({"chat": "chat: 128 tokens out", "prompt": "prompt-heavy: ~1,000 in, 16 out"}[workload])
        ax.set_ylabel("tokens/s" if workload == "chat" else "prompt + completion tokens/s")
        ax.set_ylim(0, 1.25 * max(max(r["llama-server"]["tok_s"], r["ours"]["tok_s"]) for r in rs))
        ax.legend(loc="upper left", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,8,16")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level (median reported)")
    ap.add_argument("--per-user", type=int, default=2,
                    help="requests per user per round, at levels of more than one user")
    ap.add_argument("--single-user-requests", type=int, default=8,
                    help="requests a side a round at one user (the sides take turns request by request)")
    ap.add_argument("--gateway-calls", type=int, default=300)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="of: " + ", ".join(WORKLOADS))
    ap.add_argument("--skip-gateway", action="store_true")
    ap.add_argument("--gateway-base", type=Path, metavar="CHECKOUT",
                    help="also measure the gateway of another checkout (e.g. a git worktree of main) in the same run")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, levels 1 and 8, 2 single-user requests a side, 30 gateway calls")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.levels, args.gateway_calls, args.single_user_requests = 1, "1,8", 30, 2
    levels = [int(x) for x in args.levels.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)

    from model_api.engine.local import default_model_path

    version = llama_cpp_version()
    binary = llama_server_binary(version)
    threads = os.cpu_count() or 2
    results: dict = {"llama_cpp_python": version, "cores": threads, "levels": levels, "rounds": args.rounds,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_at_start": load()}
    with LlamaServer(binary, default_model_path(), threads) as ls:
        if not args.skip_throughput:
            with Ours("defaults") as ours:
                results["throughput"] = throughput(ls, ours, levels, args.rounds, args.per_user,
                                                   args.workloads.split(","), args.single_user_requests)
                results["local_gateway"] = local_gateway(ours, min(args.gateway_calls, 200))
        if not args.skip_gateway:
            results["gateway"] = gateway(ls, args.gateway_calls, args.gateway_base)
    results["load_at_end"] = load()
    (OUT / "vs_llama_server.json").write_text(json.dumps(results, indent=1))

    print(f"\n# llama-cpp-python {version}, {threads} cores, load {results['load_at_start']} -> "
          f"{results['load_at_end']}")
    if "throughput" in results:
        rows = results["throughput"]
        print("| workload | users | llama-server tok/s | ours tok/s | ratio | TTFT p50 ls / ours (ms) | "
              "TTFT p99 ls / ours (ms) | latency p50 ls / ours (ms) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            a, b = r["llama-server"], r["ours"]
            print(f"| {r['workload']} | {r['users']} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {r['ratio']:.2f}× | "
                  f"{a['ttft_p50_ms']:.0f} / {b['ttft_p50_ms']:.0f} | {a['ttft_p99_ms']:.0f} / {b['ttft_p99_ms']:.0f} | "
                  f"{a['latency_p50_ms']:.0f} / {b['latency_p50_ms']:.0f} |")
        print("\n" + ascii_chart(rows))
        if plot(rows, ROOT / "bench" / "vs_llama_server.png"):
            print("plot: bench/vs_llama_server.png")
        g = results["local_gateway"]
        print(f"\nlocal engine, server-side gateway time: p50 {g['p50_ms']:.1f} ms, p99 {g['p99_ms']:.1f} ms "
              f"({g['calls']} calls)")
    if "gateway" in results:
        g = results["gateway"]
        print(f"\ngateway, {g['calls']} one-token calls each, interleaved (client-side):")
        print(f"  llama-server direct  p50 {g['direct']['p50_ms']:.1f} ms  p99 {g['direct']['p99_ms']:.1f} ms")
        for name in ("ours", "litellm", "ours-base"):
            if name not in g:
                continue
            print(f"  through {name:9}     p50 {g[name]['p50_ms']:.1f} ms  p99 {g[name]['p99_ms']:.1f} ms  "
                  f"added p50 {g[name]['added_p50_ms']:+.1f} ms  p99 {g[name]['added_p99_ms']:+.1f} ms")
        print(f"  ours / LiteLLM added p50: {g['ours_vs_litellm_added_p50']:.2f}×")
        if "ours_vs_base_added_p50" in g:
            print(f"  ours / ours-base added p50: {g['ours_vs_base_added_p50']:.2f}×")


if __name__ == "__main__":
    main()
