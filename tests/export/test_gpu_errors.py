"""Failures that only a GPU machine meets, each a one-line error naming what failed, the GPU or provider and the
fix, never a silent CPU fallback or a "no GPU" on a machine that has one. No GPU here: torch.cuda and the TensorRT
module are faked (monkeypatch), ONNX Runtime's fallback is the real one of its CPU build."""

import enum
import importlib.metadata
import shutil
from types import SimpleNamespace

import pytest
import torch

import sdfast
from sdfast.backends import tensorrt as trt_backend
from sdfast.cli import main
from sdfast.export import flavour as trt_flavour
from sdfast.export import tensorrt as trt
from sdfast.export.errors import EngineError
from sdfast.export.profiles import Shapes

FIX = "Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
RTX_FIX = ("on this GPU use backend='triton', 'compile' or 'onnxruntime' (onnxruntime-gpu), or NVIDIA's full "
           "`tensorrt` package (pip install tensorrt; sdfast prefers it to TensorRT-RTX)")
# TensorRT-RTX 1.7.1's ComputeCapability enum, as tensorrt_rtx_bindings defines it
ComputeCapability = enum.IntEnum("ComputeCapability", {"NONE": 0, "CURRENT": 1, "SM75": 75, "SM80": 80, "SM86": 86,
                                                       "SM89": 89, "SM120": 120, "SM121": 121})


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch sees one CUDA GPU, ``name`` with ``capability``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def use_module(monkeypatch, module) -> None:
    """``module`` as the TensorRT module that sdfast found (``tensorrt()``), for the builder and the backend."""
    monkeypatch.setattr(trt_flavour, "tensorrt", lambda: module)
    monkeypatch.setattr(trt, "tensorrt", lambda: module)
    monkeypatch.setattr(trt_backend, "tensorrt", lambda: module)


class Over:
    """A TensorRT module with some attributes replaced, the rest the real module's."""

    def __init__(self, module, **replaced):
        self.__dict__.update(replaced)
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def real_tensorrt():
    """The installed TensorRT module (call it before ``use_module``)."""
    if not trt_flavour.HAS_TENSORRT:
        pytest.skip("no TensorRT module: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    return trt_flavour.tensorrt()


@pytest.fixture
def folder_copy(sd1_onnx, tmp_path):
    """A private copy of the export folder, without engines."""
    return shutil.copytree(sd1_onnx.folder, tmp_path / "onnx", ignore=shutil.ignore_patterns("engines"))


# -- 1. onnxruntime: a CUDA provider that did not load is an error, not a silent run on the CPU --


@pytest.fixture
def relu_onnx(tmp_path):
    onnx = pytest.importorskip("onnx", reason='the onnx extra is not installed: pip install -e ".[onnx]"')
    pytest.importorskip("onnxruntime")
    h = onnx.helper
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "relu", [h.make_tensor_value_info("x", 1, [1])],
                         [h.make_tensor_value_info("y", 1, [1])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "relu.onnx")
    return tmp_path / "relu.onnx"


def no_working_cuda_provider():
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers() and torch.cuda.is_available():
        pytest.skip("a working CUDA provider here: no fallback to show")


def installed(monkeypatch, **versions):
    """importlib.metadata finds exactly these distributions (onnxruntime_gpu= for onnxruntime-gpu)."""
    versions = {name.replace("_", "-"): v for name, v in versions.items()}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_ort_session_refuses_a_silent_cpu_fallback(relu_onnx, monkeypatch):
    """ONNX Runtime's CPU build, asked for the CUDA provider, only warns and runs on the CPU (as it does when
    onnxruntime-gpu cannot load CUDA / cuDNN): ort_session says so, with what is installed and the fix."""
    import onnxruntime

    from sdfast.export.errors import ExportError
    from sdfast.export.session import ort_session

    no_working_cuda_provider()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    providers = ", ".join(onnxruntime.get_available_providers())
    version = importlib.metadata.version("onnxruntime")
    with pytest.raises(ExportError) as e:
        ort_session(relu_onnx, [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
    assert str(e.value) == (
        "ONNX Runtime did not load its CUDAExecutionProvider for relu.onnx and would run it on the CPU; available "
        f"providers: {providers}; installed: onnxruntime {version}. {FIX} (the build for CUDA 12.8, with its "
        "cuDNN), or load with device='cpu'")
    assert ort_session(relu_onnx).get_providers() == ["CPUExecutionProvider"]  # asking for the CPU is no error


def test_onnxruntime_backend_on_cuda_refuses_a_provider_that_did_not_load(relu_onnx, monkeypatch):
    """onnxruntime-gpu installed (its CUDA provider listed) but the provider does not load, e.g. CUDA libraries
    missing: the backend's session on device cuda fails naming both, instead of running on the CPU."""
    import onnxruntime

    from sdfast.backends.onnxruntime import Session

    no_working_cuda_provider()
    fake_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    installed(monkeypatch, onnxruntime_gpu="1.22.0")
    with pytest.raises(ValueError) as e:
        Session(relu_onnx, torch.device("cuda:0"))
    assert str(e.value) == (
        "ONNX Runtime did not load its CUDAExecutionProvider for relu.onnx and would run it on the CPU; available "
        "providers: TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider; installed: "
        f"onnxruntime-gpu 1.22.0. {FIX} (the build for CUDA 12.8, with its cuDNN), or load with device='cpu'")


def test_no_cuda_provider_names_what_is_installed(monkeypatch):
    """Both wheels installed (they overwrite each other's files) and no CUDA provider: the message says so."""
    import onnxruntime

    from sdfast.backends.onnxruntime import providers_for

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    installed(monkeypatch, onnxruntime="1.22.0", onnxruntime_gpu="1.22.0")
    with pytest.raises(ValueError) as e:
        providers_for(torch.device("cuda:0"))
    assert str(e.value) == (
        "this onnxruntime has no CUDA provider; available providers: CPUExecutionProvider; installed: onnxruntime "
        f"1.22.0 and onnxruntime-gpu 1.22.0. {FIX} (the build for CUDA 12.8, with its cuDNN), or load with "
        "device='cpu'")


# -- 2. the tensorrt backend: an engine or an execution context TensorRT could not make --


class _Logger:
    ERROR = 1

    def __init__(self, severity):
        pass


class _Engine:
    """An engine whose execution contexts come out None, as TensorRT's do when they do not fit."""

    def create_execution_context(self, config=None):
        return None

    def create_runtime_config(self):
        return SimpleNamespace(create_runtime_cache=lambda: object(), set_runtime_cache=lambda cache: None)


def fake_runtime(name: str, engine) -> SimpleNamespace:
    return SimpleNamespace(__name__=name, __version__="1.7.1.116", Logger=_Logger,
                           Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine))


@pytest.mark.parametrize("flavour", ["tensorrt", "tensorrt_rtx"])
def test_an_execution_context_tensorrt_cannot_make_is_named(tmp_path, monkeypatch, flavour):
    path = tmp_path / "unet-0123.engine"
    path.write_bytes(b"plan")
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))
    use_module(monkeypatch, fake_runtime(flavour, _Engine()))
    with pytest.raises(EngineError) as e:
        trt_backend.EngineRunner(path, {"network": "unet", "io": []}, torch.device("cuda"))
    assert str(e.value) == (
        f"engine {path}: TensorRT could not create an execution context on NVIDIA GeForce RTX 4090 (sm_89) (out of "
        "GPU memory, most likely; see TensorRT's errors above): free GPU memory (other engines, processes) or build "
        "for smaller sizes or batches (sdfast build --sizes / --batch)")


def test_an_engine_that_does_not_deserialise_is_named(tmp_path, monkeypatch):
    path = tmp_path / "unet-0123.engine"
    path.write_bytes(b"plan")
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))
    use_module(monkeypatch, fake_runtime("tensorrt", None))
    with pytest.raises(EngineError) as e:
        trt_backend.EngineRunner(path, {"network": "unet", "io": []}, torch.device("cuda"))
    assert str(e.value) == (
        f"engine {path} does not load on NVIDIA GeForce RTX 4090 (sm_89) (built by another TensorRT or for another "
        "GPU, or out of GPU memory; see TensorRT's errors above): rebuild it with `sdfast build` on this machine")


# -- 3. a failed build says where it failed: on this GPU, or for want of one --


def _refusing_builder(logger):
    raise TypeError("pybind11::init(): factory function returned nullptr")


def test_a_builder_that_fails_on_a_gpu_is_not_called_no_gpu(folder_copy, monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))
    module = real_tensorrt()
    use_module(monkeypatch, Over(module, Builder=_refusing_builder))
    with pytest.raises(EngineError) as e:
        trt.build_engines(folder_copy, Shapes.parse(["64x64"], [1]), networks=("text_encoder",))
    name = "tensorrt" if module.__name__ == "tensorrt" else "tensorrt_rtx"
    assert str(e.value) == (
        f"{name} {module.__version__} could not create a builder (TypeError: pybind11::init(): factory function "
        "returned nullptr) on NVIDIA GeForce RTX 4090 (sm_89): see TensorRT's errors logged above (out of GPU "
        "memory, a layer or precision this GPU lacks, a driver too old for this TensorRT)")


def test_a_build_that_returns_no_plan_names_the_gpu(folder_copy, monkeypatch):
    """``build_serialized_network`` returning None (after a real parse) on a GPU: that GPU and TensorRT's log."""
    module = real_tensorrt()

    class Builder:
        def __init__(self, logger):
            self.builder = module.Builder(logger)

        def __getattr__(self, name):
            return getattr(self.builder, name)

        def build_serialized_network(self, graph, config):
            return None

    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))
    use_module(monkeypatch, Over(module, Builder=Builder))
    if trt_flavour.flavour()["flavour"] == "tensorrt":
        pytest.skip("full TensorRT's timing cache needs a real GPU")
    with pytest.raises(EngineError) as e:
        trt.build_engines(folder_copy, Shapes.parse(["64x64"], [1]), networks=("text_encoder",))
    assert str(e.value) == (
        f"tensorrt_rtx {module.__version__} could not build text_encoder.onnx on NVIDIA GeForce RTX 4090 (sm_89): "
        "see TensorRT's errors logged above (out of GPU memory, a layer or precision this GPU lacks, a driver too "
        "old for this TensorRT)")


@pytest.mark.parametrize("flavour", ["tensorrt", "tensorrt_rtx"])
def test_a_builder_that_fails_without_a_gpu_says_so(folder_copy, monkeypatch, flavour):
    """Only where torch sees no GPU does the message blame its absence, and only full TensorRT needs one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    use_module(monkeypatch, Over(real_tensorrt(), __name__=flavour, __version__="10.13.3",
                                 Builder=_refusing_builder))
    with pytest.raises(EngineError) as e:
        trt.build_engines(folder_copy, Shapes.parse(["64x64"], [1]), networks=("text_encoder",))
    failed = (f"{flavour} 10.13.3 could not create a builder (TypeError: pybind11::init(): factory function returned "
              "nullptr)")
    if flavour == "tensorrt":
        assert str(e.value) == (
            f"{failed}: torch sees no CUDA GPU here, and full TensorRT builds only on one; build on the GPU the "
            "engines will run on, or install TensorRT-RTX (pip install tensorrt-rtx-cu13-libs "
            "tensorrt-rtx-cu13-bindings), which builds without one")
    else:
        assert str(e.value) == (f"{failed} (no CUDA GPU here; TensorRT-RTX needs none to build): see TensorRT's "
                                "errors logged above")


# -- 4. TensorRT-RTX on a GPU it cannot target (sm_90: H100, H200) --


RTX = SimpleNamespace(__name__="tensorrt_rtx_bindings", __version__="1.7.1.116", ComputeCapability=ComputeCapability)
H200 = ("TensorRT-RTX 1.7.1.116 cannot run engines on NVIDIA H200 (sm_90): its targets are sm_75, sm_80, sm_86, "
        f"sm_89, sm_120, sm_121; {RTX_FIX}")


def test_the_tensorrt_backend_refuses_a_gpu_tensorrt_rtx_cannot_target(sd1_onnx, monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    use_module(monkeypatch, RTX)
    monkeypatch.setattr(trt_backend, "find_engines", lambda *a: pytest.fail("looked for engines to load"))
    with pytest.raises(EngineError) as e:
        sdfast.load(sd1_onnx.folder, backend="tensorrt", device="cuda")
    assert str(e.value) == H200


def test_sdfast_build_refuses_a_gpu_tensorrt_rtx_cannot_target(folder_copy, monkeypatch, capsys):
    fake_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    use_module(monkeypatch, RTX)
    assert main(["build", str(folder_copy), "--sizes", "64x64"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"sdfast build: error: {H200}"
    assert not (folder_copy / trt.ENGINES).exists()  # refused before any build


def test_tensorrt_rtx_targets_come_from_its_module(monkeypatch):
    """The targets are the module's ComputeCapability SM members, RTX_TARGETS where it has no such enum; a GPU
    among them, or full TensorRT on any GPU, passes."""
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    use_module(monkeypatch, SimpleNamespace(__name__="tensorrt_rtx", __version__="1.0.0.21"))
    with pytest.raises(EngineError) as e:
        trt_flavour.check_target()
    assert str(e.value) == ("TensorRT-RTX 1.0.0.21 cannot run engines on NVIDIA H100 80GB HBM3 (sm_90): its targets "
                            f"are sm_75, sm_80, sm_86, sm_89, sm_120; {RTX_FIX}")
    use_module(monkeypatch, SimpleNamespace(__name__="tensorrt", __version__="10.13.3"))
    trt_flavour.check_target()
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))
    use_module(monkeypatch, RTX)
    trt_flavour.check_target()


def test_the_installed_tensorrt_rtx_cannot_target_an_h200(monkeypatch):
    """The real module's enum: its RTX-class targets, and no sm_90."""
    module = real_tensorrt()
    if not hasattr(module, "ComputeCapability"):
        pytest.skip("full TensorRT: no TensorRT-RTX target list")
    fake_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    with pytest.raises(EngineError) as e:
        trt_flavour.check_target()
    message = str(e.value)
    assert message.startswith(f"TensorRT-RTX {module.__version__} cannot run engines on NVIDIA H200 (sm_90): its "
                              "targets are ") and message.endswith(f"; {RTX_FIX}")
    assert "sm_80, sm_86, sm_89, sm_120" in message and "sm_90," not in message
