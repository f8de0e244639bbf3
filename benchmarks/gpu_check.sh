#!/usr/bin/env bash
# The GPU check of benchmarks/gpu_check.py, ready for a machine that has torch, transformers and
# accelerate but not the rest of our dependencies, and no network (see benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh                      # CUDA: SD 1.5 at 512 px, SDXL at 1024 px
#   bash benchmarks/gpu_check.sh --tiny --device cpu  # tiny models on a CPU (what the test runs)
#
# Wheels in WHEELS (default: .whl/ in the repository) are installed into SITE (default
# /tmp/site) when PYTHON (default python3) cannot import diffusers and pydantic yet; the
# repository itself goes on PYTHONPATH, so nothing needs installing in place.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
wheels="${WHEELS:-$repo/.whl}"
site="${SITE:-/tmp/site}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import diffusers, pydantic" 2>/dev/null; then
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        echo "gpu_check.sh: $python lacks diffusers or pydantic, and $wheels holds no wheels" >&2
        exit 2
    fi
    echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site" >&2
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site:$PYTHONPATH"
fi
exec "$python" benchmarks/gpu_check.py "$@"
