#!/usr/bin/env bash
# Build llama-cpp-python once per set of build inputs and print the wheel's path.
#
#   scripts/build-llama.sh PIP VERSION          build if needed, print the wheel's path
#   scripts/build-llama.sh --where PIP VERSION  print the wheelhouse directory only
#
# Why not `pip install llama_cpp_python==VERSION` with CMAKE_ARGS: pip caches the
# built wheel by version alone, so changing the flags silently reinstalled the
# old build. Here the wheel lives in a directory named by a hash of everything
# that shapes it (version, CMAKE_ARGS, the CPU variants, the recipe below), under
# $LLAMA_WHEELHOUSE (default ~/.cache/model-api/wheels), outside the repo.
#
# The build (docs/performance.md): the CPU backend is compiled once per x86-64
# level and the best one for the CPU is loaded at run time
# (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS; engine/local.py load_backends). A
# native build (-march=native) runs only on CPUs like the build machine's, and
# crashed in the AMX matmul on Sapphire Rapids; llama.cpp's full variant list
# has 13 variants (an hour to build on 2 busy cores) including that AMX one.
# LLAMA_CPU_VARIANTS keeps the ones that matter:
#   x64       any x86-64 CPU (the floor)
#   haswell   AVX2 + FMA + F16C + BMI2: Intel since 2013, every AMD Zen
#   skylakex  + AVX-512F: Skylake-SP / Cascade Lake Xeons
#   icelake   + AVX-512 VBMI / VNNI: Ice Lake and later Xeons (Sapphire Rapids
#             without AMX), AMD Zen 4 / Zen 5
set -euo pipefail

# All in a function that bash parses whole before running it: a bash script is
# otherwise read as it runs, and editing it during the (long) build broke the run.
main() {

  where=
  if [[ "${1:-}" == --where ]]; then where=1; shift; fi
  pip=${1:?usage: build-llama.sh [--where] PIP VERSION}
  version=${2:?usage: build-llama.sh [--where] PIP VERSION}
  : "${CMAKE_ARGS:?the build flags: set by the Makefile and the Dockerfile}"
  : "${LLAMA_CPU_VARIANTS:=x64 haswell skylakex icelake}"
  : "${LLAMA_WHEELHOUSE:=$HOME/.cache/model-api/wheels}"
  export CMAKE_ARGS

  # bump when a change to the steps below changes what gets built (editing a comment needs no rebuild)
  recipe=1
  key=$( { echo "$version"; echo "$CMAKE_ARGS"; echo "$LLAMA_CPU_VARIANTS"; echo "$recipe"; } | sha256sum | cut -c1-12)
  house="$LLAMA_WHEELHOUSE/llama_cpp_python-$version-$key"
  if [[ -n "$where" ]]; then
    echo "$house"
    exit 0
  fi
  wheel=$(ls "$house"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)
  if [[ -n "$wheel" ]]; then
    echo "$wheel"
    exit 0
  fi

  rm -rf "$house.partial"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo ">>> building llama-cpp-python $version ($CMAKE_ARGS; CPU variants: $LLAMA_CPU_VARIANTS) into $house" >&2
  "$pip" download --quiet --no-deps --no-binary llama_cpp_python "llama_cpp_python==$version" -d "$work" >&2
  tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
  src="$work/llama_cpp_python-$version"
  # llama.cpp offers no option to pick variants: drop the other x86 lines of its list
  lists="$src/vendor/llama.cpp/ggml/src/CMakeLists.txt"
  x86="x64 sse42 sandybridge ivybridge piledriver haswell skylakex cannonlake cascadelake icelake cooperlake zen4 alderlake sapphirerapids"
  drop=$(tr ' ' '\n' <<<"$x86" | grep -vxF -f <(tr ' ' '\n' <<<"$LLAMA_CPU_VARIANTS") | paste -sd'|')
  for v in $LLAMA_CPU_VARIANTS; do
    grep -Eq "ggml_add_cpu_backend_variant\($v[ )]" "$lists" || { echo "no CPU variant $v in $lists" >&2; exit 1; }
  done
  sed -Ei "/^\s*ggml_add_cpu_backend_variant\((${drop})[ )]/d" "$lists"
  # The variants are installed to CMAKE_INSTALL_BINDIR: put them beside libllama in the package
  CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_INSTALL_BINDIR=llama_cpp/lib" \
    "$pip" wheel --quiet --no-deps -w "$house.partial" "$src" >&2
  rm -rf "$house"
  mv "$house.partial" "$house"  # a wheel is in $house only once it is complete
  ls "$house"/llama_cpp_python-"$version"-*.whl | head -1
}

main "$@"
