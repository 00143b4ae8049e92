#!/usr/bin/env bash
# Sets up the private PyTorch venv that the benchmarks compare against (PyTorch
# 2.x from the Python package registry) and prints its python's path last.
# Idempotent: an existing venv with torch is reused.
#   TORCH_VENV   where (default ~/.cache/ringflow/torch-venv)
set -euo pipefail
venv=${TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ringflow/torch-venv}
py=$venv/bin/python
if [[ -x $py ]] && "$py" -c 'import torch' 2>/dev/null; then
  echo "$py"
  exit 0
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "torch_venv: python3-venv is missing; installing it" >&2
  as_root=(); [[ $(id -u) == 0 ]] || as_root=(sudo)
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2
fi
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv" >&2
# The registry's Linux wheel brings CUDA libraries (several GB); only the CPU
# side is used here.
"$venv/bin/pip" install -q torch numpy >&2
"$py" -c 'import torch; print("torch_venv: torch", torch.__version__)' >&2
echo "$py"
