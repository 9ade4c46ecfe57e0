"""What the machine can really do: device, dtype, compile and matmul precision.

Each choice can be overridden by a flag; `describe()` gives the one line that commands print.
bf16 is used only where the hardware runs it natively: on a CPU without AVX-512 BF16/AMX it is
emulated and about 300x slower than fp32, so CPUs get fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from gptlab.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) by device name, for MFU.
_GPU_PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12,
    "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    compile: bool

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        name = self.device.type
        if self.device.type == "cuda":
            name = f"cuda ({torch.cuda.get_device_name(self.device)})"
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"device {name}, dtype {dt}, compile {'on' if self.compile else 'off'}"

    def peak_flops(self) -> float | None:
        """The device's peak FLOP/s in the chosen dtype where known, for MFU; None otherwise."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                if self.dtype == torch.float32:
                    return peak / 2  # TF32 tensor cores run at half the bf16 rate
                return peak
        return None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()


def pick_device(name: str | None = None) -> torch.device:
    """cuda, then mps, then cpu, unless `name` says which."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' asked for, but MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps")
    return dev


def pick_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """bf16 where the device runs it natively, fp16 on GPUs without bf16, fp32 on CPUs."""
    if name not in (None, "", "auto"):
        if name not in DTYPES:
            raise UserError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float32
    return torch.float32


def get_runtime(device: str | None = None, dtype: str | None = None, compile: bool | None = None) -> Runtime:
    dev = pick_device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dt = pick_dtype(dev, dtype)
    if compile is None:
        compile = dev.type == "cuda"
    return Runtime(device=dev, dtype=dt, compile=compile)
