#!/usr/bin/env bash
# Installs what ringflow needs to build and test on Debian 12; idempotent and quick when done.
#
# Checks each package with dpkg-query and runs apt-get (update + install) only
# for what is missing. Works as root, or through sudo when it exists.
# RINGFLOW_SKIP_DEPS=1 skips everything (machines without a package registry).
set -euo pipefail

packages=(
  cmake g++ make                       # toolchain
  libopenmpi-dev openmpi-bin           # MPI backend, mpirun
  libeigen3-dev libfmt-dev zlib1g-dev  # library dependencies
  catch2                               # tests
  nlohmann-json3-dev                   # the library's JSON files (private, header-only; src/core/json.hpp)
  ccache                               # compiler cache: run_tests.sh builds three trees (release, asan, tsan)
  clang-format                         # the format check (scripts/check_format.sh, in run_tests.sh)
  libgloo-dev                          # benchmark peer
  dataset-fashion-mnist                # training example data
  libopenblas0-pthread                 # fast CPU products, loaded at run time (docs/design.md)
)

if [[ "${RINGFLOW_SKIP_DEPS:-0}" == 1 ]]; then
  echo "install_deps: RINGFLOW_SKIP_DEPS=1, not checking dependencies"
  exit 0
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install_deps: dpkg-query not found: this script knows Debian/Ubuntu only." >&2
  echo "install_deps: install these (or their equivalents) yourself: ${packages[*]}" >&2
  echo "install_deps: then rerun with RINGFLOW_SKIP_DEPS=1." >&2
  exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if (( ${#missing[@]} == 0 )); then
  echo "install_deps: all dependencies present"
  exit 0
fi

echo "install_deps: missing: ${missing[*]}"
if [[ "$(id -u)" == 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install_deps: not root and no sudo; as root, run:" >&2
  echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
echo "install_deps: installed ${missing[*]}"
