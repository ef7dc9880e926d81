#!/usr/bin/env bash
# The GPU machine's versions, on CPU: runs the Triton kernel tests (in Triton's CPU interpreter) and the backend
# tests in a virtual environment with the GPU image's torch 2.11 / triton 3.6 / numpy < 2.4 (Triton 3.6's
# interpreter breaks on numpy >= 2.4), so that code which only works on CI's newer torch / triton fails here, not
# on the GPU. Builds the environment once and reuses it while it holds the right versions.
#
#   bash benchmarks/gpu/compat.sh                # tests/kernels + tests/backends, less the ControlNet ONNX exports
#   bash benchmarks/gpu/compat.sh tests/test_sdxl_pipeline.py -k fp16   # any other pytest arguments instead
#   bash benchmarks/gpu/compat.sh --rehearse     # the tests, and beside them `run.sh --rehearse` here (CI runs this)
#
# Each of the two keeps about one core busy (its CPU time is about its wall time), so on a 2-core CPU they take
# together about as long as the longer one alone: 360 s, against 341 s and 385 s one after the other.
#
# SDFAST_COMPAT_VENV: where the environment lives (default /tmp/sdfast-compat-venv; ~5 GB: the CUDA torch wheel).
# SDFAST_COMPAT_PYTHON: the interpreter that creates it (default python3; the GPU machine runs 3.12).
set -euo pipefail
cd "$(dirname "$0")/../.."
REHEARSE=0
[[ "${1:-}" == --rehearse ]] && { REHEARSE=1; shift; }

VENV=${SDFAST_COMPAT_VENV:-/tmp/sdfast-compat-venv}
PYTHON=${SDFAST_COMPAT_PYTHON:-python3}
# The GPU image's versions (torch 2.11.0+cu130 brings triton 3.6.0; its numpy 2.5.2 breaks Triton 3.6's interpreter,
# which the GPU never uses; diffusers 0.42.1 and onnxslim 0.1.98 are what benchmarks/gpu/wheels.sh carries there).
# pip resolves torch==2.11.0 to the CUDA build: it runs on CPU as well.
PINS=(torch==2.11.0 triton==3.6.0 "numpy<2.4" transformers==5.17.0 diffusers==0.42.1 huggingface-hub==1.33.0
      tokenizers==0.23.2 safetensors==0.8.0 onnx==1.23.1 onnxruntime==1.30.0 onnxscript==0.7.2 onnxslim==0.1.98)
# The rest of sdfast's run-time dependencies, pytest (the image has pytest 8 or 9; any will do here), and what the
# rehearsal of benchmarks/gpu/run.sh uses in this environment (the image has pytest-benchmark and matplotlib; the
# schema check is the rehearsal's own).
# setuptools >= 70.1 builds the editable install below without build isolation, as the GPU run's setup stage does.
DEPS=(pillow tqdm pytest pytest-benchmark matplotlib jsonschema "setuptools>=70.1")
PY="$VENV/bin/python"

ready() {  # the environment holds the pinned versions, every dependency, and this checkout's sdfast (editable)
    [[ -x "$PY" ]] && "$PY" - "${PINS[@]}" "${DEPS[@]}" <<'EOF' 2>/dev/null
import importlib.metadata as md, os, sys
from packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    assert req.specifier.contains(md.version(req.name).split("+")[0], prereleases=True), spec
import sdfast, sdfast.kernels
assert os.path.samefile(os.path.dirname(sdfast.__file__), "sdfast")
assert os.path.samefile(os.path.dirname(sdfast.kernels.__file__), "kernels")
EOF
}

start=$SECONDS
if ! ready; then
    echo "compat: building $VENV (a new one downloads the 4.7 GB CUDA torch 2.11 wheel and its libraries)" >&2
    [[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
    pip=("$PY" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" --upgrade pip packaging
    "${pip[@]}" "${PINS[@]}" "${DEPS[@]}"
    "${pip[@]}" --no-deps --no-build-isolation -e .
    ready || { echo "compat: $VENV still lacks the pinned versions or this checkout's sdfast" >&2; exit 1; }
    echo "compat: environment ready in $((SECONDS - start)) s" >&2
fi

"$PY" - <<'EOF'
import platform, importlib.metadata as md
names = ["torch", "triton", "numpy", "transformers", "diffusers", "onnx", "onnxruntime", "onnxscript", "onnxslim"]
print("compat: python " + platform.python_version() + ", " + ", ".join(f"{n} {md.version(n)}" for n in names))
EOF

# The ControlNet ONNX export tests took half of this run's time (6 of 12 minutes on a 2-core CPU) and the GPU run never
# exports: the plain export and ONNX Runtime stay covered on these versions by tests/backends/test_onnxruntime.py.
(($#)) || set -- tests/kernels tests/backends --ignore=tests/backends/test_controlnet_exported.py
if ((REHEARSE)); then  # started once the environment is whole (ready): the rehearsal installs nothing into it
    rehearsal_log=$(mktemp)
    SDFAST_INSTALLED=1 PATH="$VENV/bin:$PATH" bash benchmarks/gpu/run.sh --rehearse >"$rehearsal_log" 2>&1 &
    rehearsal=$!
fi
start=$SECONDS
tests=0
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider "$@" || tests=$?
if ((tests)); then
    echo "compat: tests FAILED (exit $tests) in $((SECONDS - start)) s" >&2
else
    echo "compat: tests passed in $((SECONDS - start)) s" >&2
fi
if ((REHEARSE)); then
    rehearsed=0
    wait "$rehearsal" || rehearsed=$?
    cat "$rehearsal_log"
    rm -f "$rehearsal_log"
    if ((rehearsed)); then
        echo "compat: the rehearsal FAILED (exit $rehearsed)" >&2
        exit "$rehearsed"
    fi
fi
exit "$tests"
