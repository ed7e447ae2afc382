"""src.training.hardware (issue 13): which precision `auto` picks on each kind of device, a precision the device cannot
run said in one line, fp16's scaler, and the CUDA kernel settings of `deterministic` (flags only: they are
set and restored without a GPU; tests/test_faults.py holds the CUDA bit-exact resume test)."""
import os

import pytest
import torch

from src.training import hardware
from src.errors import RunError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("capability", "expected"), [((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                      ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_is_bf16_on_ampere_and_later_and_fp16_on_older_gpus(monkeypatch, capability, expected):
    """P100 (6.0), V100 (7.0), T4 and RTX 20xx (7.5) have no native bf16: fp16 with a scaler there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert hardware.choose_precision("auto", CUDA) == expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_is_todays_rule(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    assert hardware.choose_precision("auto", CPU) == ("bf16" if native else "fp32")


def test_explicit_precisions_run_on_this_cpu():
    for precision in ("fp32", "bf16", "fp16"):
        assert hardware.choose_precision(precision, CPU) == precision


def test_a_precision_the_device_cannot_run_is_one_line(monkeypatch):
    def no_half(device, precision):
        raise RuntimeError("Unsupported dtype Half for this device\nsecond line")

    monkeypatch.setattr(hardware, "autocast", no_half)
    with pytest.raises(RunError) as excinfo:
        hardware.choose_precision("fp16", CPU)
    message = str(excinfo.value)
    assert message == ("--precision=fp16 does not run on cpu (Unsupported dtype Half for this device); "
                       "use --precision=auto or fp32")
    assert hardware.choose_precision("fp32", CPU) == "fp32"  # fp32 needs no check


def test_autocast_dtype_follows_the_precision():
    x = torch.ones(2, 4)
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with hardware.autocast(CPU, precision):
            assert torch.nn.functional.linear(x, torch.ones(3, 4)).dtype == dtype


def test_only_fp16_gets_a_grad_scaler():
    assert isinstance(hardware.grad_scaler(CPU, "fp16"), torch.amp.GradScaler)
    assert hardware.grad_scaler(CPU, "bf16") is None and hardware.grad_scaler(CPU, "fp32") is None


def cuda_flags():
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled())


def test_deterministic_false_autotunes_cudnn_on_cuda_and_restores_the_flags(monkeypatch):
    before = cuda_flags()
    with hardware.kernel_settings(CUDA, deterministic=False):
        assert cuda_flags() == (True, before[1], before[2])
    assert cuda_flags() == before


def test_deterministic_true_asks_for_deterministic_kernels_on_cuda(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = cuda_flags()
    with hardware.kernel_settings(CUDA, deterministic=True):
        assert cuda_flags() == (False, True, True)
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one warns, naming itself
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert cuda_flags() == before


@pytest.mark.parametrize("deterministic", [True, False])
def test_on_a_cpu_nothing_changes(deterministic):
    """CPU runs stay bit for bit what they were before the key existed, whatever its value."""
    before = cuda_flags()
    with hardware.kernel_settings(CPU, deterministic):
        assert cuda_flags() == before


def test_the_new_keys_are_checked():
    from configs.training import TRAINING_ROOT, training_problems

    assert training_problems({**TRAINING_ROOT, "precision": "fp16", "deterministic": True, "valid_every": 5,
                              "plot_every_seconds": 0.0, "compile_mode": "max-autotune-no-cudagraphs"}) == []
    assert training_problems({**TRAINING_ROOT, "valid_every": 0}) == [
        "--valid_every must be at least 1 (epochs), not 0"]
    assert training_problems({**TRAINING_ROOT, "plot_every_seconds": -1.0}) == [
        "--plot_every_seconds must not be negative, not -1.0"]
    [problem] = training_problems({**TRAINING_ROOT, "compile_mode": "fastest"})
    assert problem.startswith("--compile_mode must be one of default, reduce-overhead,")
    [problem] = training_problems({**TRAINING_ROOT, "precision": "fp8"})
    assert problem == "--precision must be one of auto, fp32, bf16, fp16, not 'fp8'"


def test_compile_mode_reaches_torch_compile(train_here, tmp_path, monkeypatch):
    modes = []

    def compile_(module, mode=None):
        modes.append(mode)
        return module  # eager: only the mode asked for is checked here

    monkeypatch.setattr(torch, "compile", compile_)
    result = train_here(tmp_path / "run", "--n_epochs=1", "--compile=true", "--compile_mode=max-autotune-no-cudagraphs")
    assert result.returncode == 0, result.stderr
    assert modes == ["max-autotune-no-cudagraphs"]
