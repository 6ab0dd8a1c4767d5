"""The llama.cpp build: keyed by its flags, every x86-64 level's CPU backend in
the package, the best safe one loaded at run time (docs/performance.md)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-llama.sh"
MAKE_FLAGS = re.search(r"CMAKE_ARGS \?= (.+)", (ROOT / "Makefile").read_text()).group(1).strip()


def wheelhouse(tmp_path: Path, **env: str) -> str:
    """Where build-llama.sh keeps (or would build) the wheel for these inputs."""
    env = {**os.environ, "CMAKE_ARGS": MAKE_FLAGS, "LLAMA_WHEELHOUSE": str(tmp_path), **env}
    out = subprocess.run(["bash", str(SCRIPT), "--where", "pip", "0.3.36"], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out.startswith(str(tmp_path))
    return out


@pytest.mark.parametrize("change", [
    {"CMAKE_ARGS": MAKE_FLAGS + " -DGGML_AVX512=ON"},
    {"LLAMA_CPU_VARIANTS": "x64 haswell"},
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


def expected_variant(flags: set[str]) -> str:
    """The variant ggml's own scores pick among those the build keeps."""
    if {"avx512f", "avx512vbmi", "avx512_vnni"} <= flags:
        return "icelake"
    if "avx512f" in flags:
        return "skylakex"
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        return "haswell"
    return "x64"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the CPU variants are x86-64's")
def test_the_installed_llama_cpp_is_the_makefiles_build_and_loads_the_best_safe_cpu_variant():
    from llama_cpp import _ggml

    from model_api.engine.local import load_backends

    shipped = {p.stem.removeprefix("libggml-cpu-") for p in Path(_ggml.libggml_base_path).glob("libggml-cpu-*.so")}
    if "-DGGML_CPU_ALL_VARIANTS=ON" not in MAKE_FLAGS:
        # one CPU backend linked in: nothing to choose at run time
        assert not shipped and load_backends() is None
        return
    # `make install` replaces a wheel built with other flags (its wheelhouse is keyed by them)
    assert {"x64", "haswell", "skylakex", "icelake"} <= shipped, shipped
    assert "sapphirerapids" not in shipped  # AMX: crashed on some Xeons
    assert load_backends() == expected_variant(cpu_flags())
    assert load_backends() == expected_variant(cpu_flags())  # once per process
