#!/usr/bin/env bash
# LibTorch for kiln's `tch` feature: PyTorch 2.9.0 (the exact version burn-tch 0.22 builds against)
# in a virtual environment outside the repository, and the environment a build and a run need.
#
#   eval "$(scripts/libtorch.sh)"                # installs once (~3 GB: PyPI's wheel is the CUDA build), then exports
#   cargo build --release -p kiln-cli --features tch
#   target/release/kiln train-student ... --device tch        # tch-cpu for LibTorch on the CPU
#
# KILN_LIBTORCH_VENV: where the environment goes [default: ~/.cache/kiln/torch-venv].
# KILN_TORCH_INDEX: another package index, e.g. https://download.pytorch.org/whl/cpu for the
#   200 MB CPU-only build (where that site is reachable).
# Only the `export` lines go to stdout (for eval); progress goes to stderr.
set -euo pipefail
venv="${KILN_LIBTORCH_VENV:-$HOME/.cache/kiln/torch-venv}"
python="$venv/bin/python"
if ! "$python" -W ignore -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.9.0")' 2>/dev/null; then
  echo "installing PyTorch 2.9.0 into $venv (once)" >&2
  python3 -m venv "$venv" >&2
  index=()
  [ -n "${KILN_TORCH_INDEX:-}" ] && index=(--index-url "$KILN_TORCH_INDEX")
  "$python" -m pip install --quiet --disable-pip-version-check "${index[@]}" torch==2.9.0 >&2
fi
lib="$("$python" -W ignore -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
# torch-sys asks this Python for the headers, the library folder and the C++ ABI.
echo "export LIBTORCH_USE_PYTORCH=1"
echo "export PATH=\"$venv/bin:\$PATH\""
echo "export LD_LIBRARY_PATH=\"$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
