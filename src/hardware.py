"""Which device and number format a run uses: the fastest that keeps accuracy, unless the config says."""
from pathlib import Path

from src.errors import RunError

BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


def choose_device(name):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("--device=cuda but no CUDA GPU is visible to PyTorch; use --device=cpu or auto")
    return torch.device(name)


def cpu_has_native_bf16():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}
    return bool(flags & BF16_CPU_FLAGS)


def choose_precision(name, device):
    """'auto' -> 'bf16' where the hardware computes it natively (AVX-512 BF16/AMX, or Ampere+), else 'fp32'."""
    import torch

    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device, precision):
    """The context a forward pass runs in: bf16 autocast, or a no-op for fp32."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
