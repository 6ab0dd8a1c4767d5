"""The llama.cpp build: keyed by its inputs, a CPU backend for AVX2 and one for
AVX-512 in the package, the one measured faster on this CPU loaded at run time
(docs/performance.md)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-llama.sh"
MAKEFILE = (ROOT / "Makefile").read_text()


def make_var(name: str) -> str:
    """A ``NAME ?= value`` default of the Makefile."""
    return re.search(rf"{name} \?= (.+)", MAKEFILE).group(1).strip()


MAKE_FLAGS, MAKE_VARIANTS = make_var("CMAKE_ARGS"), make_var("LLAMA_CPU_VARIANTS")


def wheelhouse(tmp_path: Path, **env: str) -> str:
    """Where build-llama.sh keeps (or would build) the wheel for these inputs."""
    env = {**os.environ, "CMAKE_ARGS": MAKE_FLAGS, "LLAMA_CPU_VARIANTS": MAKE_VARIANTS,
           "LLAMA_WHEELHOUSE": str(tmp_path), **env}
    out = subprocess.run(["bash", str(SCRIPT), "--where", "pip", "0.3.36"], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out.startswith(str(tmp_path))
    return out


@pytest.mark.parametrize("change", [
    {"CMAKE_ARGS": MAKE_FLAGS + " -DGGML_AVX512=ON"},
    {"LLAMA_CPU_VARIANTS": "x64 haswell icelake"},
])
def test_a_changed_build_input_gets_a_wheel_of_its_own(tmp_path, change):
    # pip's cache keys a built wheel by version alone: a flag change reused the old build
    assert wheelhouse(tmp_path) == wheelhouse(tmp_path)
    assert wheelhouse(tmp_path, **change) != wheelhouse(tmp_path)


def test_the_build_script_refuses_to_run_without_flags(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    r = subprocess.run(["bash", str(SCRIPT), "--where", "pip", "0.3.36"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "CMAKE_ARGS" in r.stderr


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def expected_variant(flags: set[str], cpu: tuple[str, str] | None) -> str | None:
    """What the Makefile's two variants and load_backends' policy give this CPU."""
    from model_api.engine.local import AVX512_FASTER_CPUS

    if not {"avx2", "fma", "f16c", "bmi2"} <= flags:
        return None  # no variant for it: load_backends says so
    if {"avx512f", "avx512vbmi", "avx512_vnni"} <= flags and cpu in AVX512_FASTER_CPUS:
        return "icelake"
    return "haswell"


ZEN4, ZEN5, XEON = ("AuthenticAMD", "25"), ("AuthenticAMD", "26"), ("GenuineIntel", "6")


@pytest.mark.parametrize("scores, cpu, picked", [
    ({"haswell": 64, "icelake": 192}, ZEN5, "icelake"),  # AVX-512 measured faster there
    ({"haswell": 64, "icelake": 192}, ZEN4, "haswell"),  # and slower here
    ({"haswell": 64, "icelake": 192}, XEON, "icelake"),  # Ice Lake and later: faster there too
    ({"haswell": 64, "icelake": 0}, XEON, "haswell"),  # Skylake-X: no AVX-512 VBMI
    ({"haswell": 64, "icelake": 192}, None, "haswell"),  # no /proc/cpuinfo
    ({"haswell": 64, "icelake": 0}, ZEN5, "haswell"),  # 0: the CPU lacks an instruction it needs
    ({"haswell": 0, "icelake": 0}, ZEN5, None),
    ({"x64": 1, "haswell": 0}, XEON, "x64"),
    ({"haswell": 64, "icelake": 192, "sapphirerapids": 999}, ZEN5, "icelake"),  # AMX: never
    ({"haswell": 64, "sapphirerapids": 999}, XEON, "haswell"),
    ({}, ZEN5, None),
])
def test_load_backends_picks_avx512_only_where_it_measured_faster_and_never_amx(scores, cpu, picked):
    from model_api.engine.local import pick_variant

    assert pick_variant(scores, cpu) == picked


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the CPU variants are x86-64's")
def test_the_installed_llama_cpp_is_the_makefiles_build_and_loads_the_best_safe_cpu_variant():
    from llama_cpp import _ggml

    from model_api.engine.local import _cpu_id, load_backends

    shipped = {p.stem.removeprefix("libggml-cpu-") for p in Path(_ggml.libggml_base_path).glob("libggml-cpu-*.so")}
    if "-DGGML_CPU_ALL_VARIANTS=ON" not in MAKE_FLAGS:
        # one CPU backend linked in: nothing to choose at run time
        assert not shipped and load_backends() is None
        return
    # `make install` replaces a wheel built with other inputs (its wheelhouse is keyed by them)
    assert shipped == set(MAKE_VARIANTS.split()), shipped
    expected = expected_variant(cpu_flags(), _cpu_id())
    if expected is None:
        with pytest.raises(RuntimeError, match="no llama.cpp CPU backend"):
            load_backends()
        return
    assert load_backends() == expected
    assert load_backends() == expected  # once per process


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the CPU variants are x86-64's")
@pytest.mark.skipif("-DGGML_CPU_ALL_VARIANTS=ON" not in MAKE_FLAGS, reason="one CPU backend linked in")
@pytest.mark.parametrize("only, loads", [("haswell", "haswell"), ("sapphirerapids", None), ("no-such", None)])
def test_load_backends_can_be_held_to_one_variant_but_never_an_unsafe_one(only, loads):
    """The benchmarks' A/B of two variants (bench_ab_engine.py), in a fresh process each:
    a variant is loaded once per process."""
    code = ("from model_api.engine.local import load_backends\n"
            f"try:\n    print(load_backends(only={only!r}))\nexcept RuntimeError:\n    print(None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.split()[-1] == str(loads), out.stderr[-2000:]
