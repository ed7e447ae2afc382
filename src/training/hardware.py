"""Which device, number format and kernels a run uses: the fastest that keep accuracy, unless the config says.

`precision=auto` and `memory_format=auto` are settled by timing the candidates (src.training.kernels); the
rule here is what `auto` falls back to where no trial runs (a short run, a folder from older code).
Precision rule: `bf16` autocast where the hardware computes bf16 natively (AVX-512 BF16/AMX CPUs, Ampere+
GPUs); `fp16` autocast with a gradient scaler (torch.amp.GradScaler) on CUDA GPUs without bf16 (V100,
T4, P100, RTX 20xx), where fp16 has the tensor cores; else `fp32`. Kernels: on CUDA, `deterministic`
decides between cuDNN's autotuner (fast, not bit-reproducible) and deterministic algorithms.
"""
import contextlib
import os
from pathlib import Path

from src.errors import RunError

BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# cuBLAS is deterministic only with a fixed workspace (PyTorch's "Reproducibility" notes); read when cuBLAS starts.
CUBLAS_WORKSPACE = ":4096:8"


def choose_device(name):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("--device=cuda but no CUDA GPU is visible to PyTorch; use --device=cpu or auto")
    return torch.device(name)


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}


def cpu_has_native_bf16():
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def cuda_has_bf16(device):
    """Ampere (compute capability 8.0) and later compute bf16 natively; older cards only emulate it, slowly."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def choose_precision(name, device):
    """'auto' -> 'bf16' on CPUs with AVX-512 BF16/AMX and on Ampere+ GPUs, 'fp16' on older CUDA GPUs, else
    'fp32'. An explicit choice is checked on the device: one it cannot run is a one-line RunError."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_bf16(device) else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if name != "fp32":
        check_precision_runs(name, device)
    return name


def check_precision(name, device):
    """An explicit precision the device cannot run is a one-line RunError (auto and fp32 always run)."""
    if name not in ("auto", "fp32"):
        check_precision_runs(name, device)


def check_precision_runs(precision, device):
    """A convolution and its gradient under `precision`'s autocast, on `device`: an error here is the device's
    answer (an old GPU without bf16, a torch build without that autocast), said in one line before any work."""
    import torch

    try:
        if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"{torch.cuda.get_device_name(device)} has no bf16")
        weight = torch.ones(2, 3, 3, 3, device=device, requires_grad=True)
        with autocast(device, precision):
            out = torch.nn.functional.conv2d(torch.ones(1, 3, 4, 4, device=device), weight)
        out.float().sum().backward()
    except (RuntimeError, TypeError, ValueError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
        raise RunError(f"--precision={precision} does not run on {device} ({detail}); "
                       "use --precision=auto or fp32") from None


def autocast_dtype(precision):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device, precision):
    """The context a forward pass runs in: bf16 or fp16 autocast, or a no-op for fp32."""
    import torch

    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device, precision):
    """fp16's loss scaler (None otherwise): fp16 gradients underflow to 0 without it. Its scale and growth
    counter go into the checkpoint, so steps it skips (inf gradients) are skipped alike after a resume."""
    import torch

    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@contextlib.contextmanager
def kernel_settings(device, deterministic):
    """CUDA kernels as `deterministic` asks, restored on exit (a notebook's later work is not changed):

    - True: deterministic algorithms only (`torch.use_deterministic_algorithms`, cuDNN without autotuning,
      cuBLAS with a fixed workspace), so that a resumed run matches an uninterrupted one bit for bit. An op
      PyTorch has no deterministic CUDA kernel for is named in a warning at its first use, not refused.
    - False: `cudnn.benchmark`, which times the candidate convolution algorithms at each new shape and
      keeps the fastest; the choice can differ between processes, so a resumed run is close, not identical.

    On a CPU nothing is changed: its kernels are deterministic for a given thread count already.
    """
    import torch

    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
            cudnn.benchmark, cudnn.deterministic = False, True
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            cudnn.benchmark = True
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])
