#!/usr/bin/env bash
# Downloads the Python 3.12 x86-64 wheels the GPU machine lacks into the git-ignored .gpu/, for the device tool to
# carry there (the machine has no network), and prints what to pass to it.
#
#   bash benchmarks/gpu/wheels.sh          # .gpu/wheels/: diffusers 0.42.1 + its requirements the image lacks
#   bash benchmarks/gpu/wheels.sh --ort    # also onnxruntime-gpu (CUDA 13) as .gpu/ort/partNN, and onnxslim
#
# The GPU image has torch 2.11 (cu130), transformers 5.17, huggingface-hub 1.33, onnx, onnxscript, onnxruntime (the
# CPU build), pytest, ... but not diffusers, importlib_metadata, onnxslim or onnxruntime-gpu. Everything that travels
# (the working tree, tracked and untracked-not-ignored files, plus the carried paths) must stay under 64 MiB a call,
# so the 247 MB onnxruntime-gpu wheel goes over in chunks, one call each, appended to /tmp/ort.tar on the machine
# (which keeps /tmp while it stays warm: 30 s after a call, so make the calls back to back).
set -euo pipefail
cd "$(dirname "$0")/../.."

ORT=0
for arg in "$@"; do
    case $arg in
        --ort) ORT=1 ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "wheels.sh: unknown argument '$arg' (use --ort or nothing)" >&2; exit 2 ;;
    esac
done

# diffusers 0.42.1 requires importlib_metadata (whatever the Python), which requires lazy-importer (Python < 3.15);
# its other requirements (filelock, huggingface-hub >= 1.32, numpy, regex, requests, safetensors >= 0.8, pillow)
# are on the image. onnxslim (sdfast's ONNX export; its requirements are on the image) only comes with --ort.
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0)
ORT_WHEEL=onnxruntime-gpu==1.30.0  # PyPI's 1.30.0 is the CUDA 13 build (libcudart.so.13, cuDNN 9 for CUDA 13)
((ORT)) && WHEELS+=(onnxslim==0.1.98)
LIMIT_MIB=64    # the device tool's limit on what travels in one call
MAX_CHUNK_MIB=56
MARGIN_MIB=1    # room for the working tree to grow a little between this script and the calls

download=(python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all:
          --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

rm -rf .gpu/wheels
mkdir -p .gpu/wheels
"${download[@]}" -d .gpu/wheels "${WHEELS[@]}"
if ((ORT)); then
    mkdir -p .gpu/ort-src  # the wheel itself, kept so that a second run does not download it again
    find .gpu/ort-src -name '*.whl' ! -name "onnxruntime_gpu-${ORT_WHEEL#*==}-*" -delete
    "${download[@]}" -d .gpu/ort-src "$ORT_WHEEL"
fi

# Every requirement of what is carried must be on the image or carried too (and pip's --no-deps checks nothing).
# The working tree's size decides the chunk size: tree + one chunk must stay under the limit.
sizes=$(python3 - "$ORT" "$LIMIT_MIB" "$MAX_CHUNK_MIB" "$MARGIN_MIB" <<'EOF'
import glob, math, os, re, subprocess, sys, zipfile
from email.parser import Parser
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

ort, limit, max_chunk, margin = int(sys.argv[1]), *map(float, sys.argv[2:])
# The GPU image's packages (python3 3.12 in /opt/torch/.venv), with the versions seen there where known.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
SEEN = {"huggingface-hub": "1.33.0", "numpy": "2.5.2", "onnx": "1.23.1", "onnxruntime": "1.30.0",
        "onnxscript": "0.7.2", "safetensors": "0.8.0", "tokenizers": "0.23.2", "torch": "2.11.0",
        "transformers": "5.17.0", "triton": "3.6.0"}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}

wheels = glob.glob(".gpu/wheels/*.whl") + (glob.glob(".gpu/ort-src/*.whl") if ort else [])
carried = {}
for path in wheels:
    with zipfile.ZipFile(path) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    carried[norm(meta["Name"])] = (meta["Version"], meta.get_all("Requires-Dist") or [])
if len(carried) != len(wheels):
    sys.exit(f"wheels.sh: two versions of one package in {sorted(wheels)}")
missing = []
for name, (_, requires) in sorted(carried.items()):
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = norm(req.name)
        version = carried[dep][0] if dep in carried else SEEN.get(dep)
        if dep not in carried and dep not in IMAGE:
            missing.append(f"{name} needs {line} (not on the GPU image)")
        elif version and not req.specifier.contains(Version(version), prereleases=True):
            missing.append(f"{name} needs {line}, but {dep} {version} is "
                           + ("carried" if dep in carried else "on the GPU image"))
if missing:
    sys.exit("wheels.sh: add these to WHEELS:\n  " + "\n  ".join(missing))

# What travels with every call: tracked and untracked-not-ignored files, and shared/ if the checkout has one.
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], check=True,
                       capture_output=True).stdout.decode().split("\0")
tree = sum(os.lstat(f).st_size for f in set(files) if f and os.path.lexists(f))
for root, _, names in os.walk("shared"):
    tree += sum(os.lstat(os.path.join(root, n)).st_size for n in names)
tree_mib = tree / 2**20
print(f"{tree_mib:.1f}", max(0, min(int(max_chunk), math.floor(limit - margin - tree_mib))))
EOF
)
read -r TREE_MIB CHUNK_MIB <<<"$sizes"

mib() { du -cb "$@" | awk 'END { printf "%.1f", $1 / 1048576 }'; }
WHEELS_MIB=$(mib .gpu/wheels/*.whl)
if ! awk -v t="$TREE_MIB" -v w="$WHEELS_MIB" -v l="$LIMIT_MIB" 'BEGIN { exit !(t + w < l) }'; then
    echo "wheels.sh: the working tree ($TREE_MIB MiB) + .gpu/wheels ($WHEELS_MIB MiB) is over $LIMIT_MIB MiB" >&2
    exit 1
fi

echo "wheels: .gpu/wheels, $WHEELS_MIB MiB:"
ls -1 .gpu/wheels | sed 's/^/  /'
echo "working tree that travels with every call: $TREE_MIB MiB (limit $LIMIT_MIB MiB a call, with the carried paths)"
echo
echo "Main run: device run with"
echo "  carry: [\".gpu/wheels\"]"
echo "  command: bash benchmarks/gpu/run.sh"

if ((ORT)); then
    ((CHUNK_MIB >= 8)) || { echo "wheels.sh: the working tree leaves only $CHUNK_MIB MiB for a chunk" >&2; exit 1; }
    rm -rf .gpu/ort
    mkdir -p .gpu/ort
    whl=$(cd .gpu/ort-src && ls onnxruntime_gpu-*.whl)
    tar -cf - -C .gpu/ort-src "$whl" | split -b "${CHUNK_MIB}M" -d -a 2 - .gpu/ort/part
    parts=(.gpu/ort/part*)
    sha=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
    total=0
    echo
    echo "onnxruntime-gpu: $whl as ${#parts[@]} chunks of at most $CHUNK_MIB MiB ($(mib "${parts[@]}") MiB in all)."
    echo "Device runs, back to back (the machine keeps /tmp only while warm, 30 s after a call), before the main run;"
    echo "each checks that /tmp/ort.tar has the bytes of the chunks before it (else: start again at part00):"
    for i in "${!parts[@]}"; do
        part=${parts[$i]}
        size=$(stat -c %s "$part")
        if ((i == 0)); then
            cmd="cat $part > /tmp/ort.tar"
        else
            cmd="test \$(stat -c %s /tmp/ort.tar) -eq $total && cat $part >> /tmp/ort.tar"
        fi
        total=$((total + size))
        if ((i == ${#parts[@]} - 1)); then
            cmd+=" && echo '$sha  /tmp/ort.tar' | sha256sum -c - && rm -rf /tmp/ort && mkdir /tmp/ort"
            cmd+=" && tar -xf /tmp/ort.tar -C /tmp/ort && python3 -m pip install -q --no-index --no-deps --no-compile"
            cmd+=" --target /tmp/site /tmp/ort/*.whl && rm /tmp/ort.tar && PYTHONPATH=/tmp/site python3 -c"
            cmd+=" 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'"
        else
            cmd+=" && ls -l /tmp/ort.tar"
        fi
        echo "  run $((i + 1))/${#parts[@]}: carry: [\"$part\"]"
        echo "    command: $cmd"
    done
    echo "Then the main run above (its PYTHONPATH=/tmp/site puts onnxruntime-gpu before the image's CPU onnxruntime)."
    echo "Total carried: $(awk -v a="$WHEELS_MIB" -v b="$(mib "${parts[@]}")" 'BEGIN { printf "%.1f", a + b }') MiB" \
         "over $((${#parts[@]} + 1)) calls, plus the $TREE_MIB MiB working tree in each."
else
    echo "Total carried: $WHEELS_MIB MiB (plus the $TREE_MIB MiB working tree)."
fi
