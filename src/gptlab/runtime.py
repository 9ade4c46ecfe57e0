"""What the machine can really do: device, dtype, compile and matmul precision.

Each choice can be overridden by a flag; `describe()` gives the one line that commands print.
bf16 is used only where the hardware runs it natively: on a CPU without AVX-512 BF16/AMX it is
emulated and about 300x slower than fp32, so CPUs get fp32.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from gptlab.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# Dense peaks (FLOP/s, no sparsity) from NVIDIA's datasheets, per dtype, for MFU. "fp32" is the
# plain CUDA-core rate, "tf32" the tensor-core rate fp32 matmuls get with TF32 on (Ampere and
# later); V100 and T4 have no TF32 and no bf16 (None: that dtype has no native peak). Each row is
# matched against torch.cuda.get_device_name() as whole words, first match wins, so L4/L40/L40S,
# A10/A10G/A100 and the H100 SXM/PCIe/NVL variants are told apart.
GPU_PEAKS: list[tuple[str, str, dict[str, float | None]]] = [
    # (pattern, canonical name, peaks in TFLOP/s)
    (r"\bH100\b.*\bNVL\b", "H100 NVL", dict(bf16=835, fp16=835, tf32=418, fp32=60)),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe", dict(bf16=756, fp16=756, tf32=378, fp32=51.2)),
    (r"\bH100\b", "H100 SXM", dict(bf16=989, fp16=989, tf32=494.7, fp32=66.9)),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", dict(bf16=835, fp16=835, tf32=418, fp32=60)),
    (r"\bGH200\b", "GH200", dict(bf16=989, fp16=989, tf32=494.7, fp32=66.9)),
    (r"\bH200\b", "H200 SXM", dict(bf16=989, fp16=989, tf32=494.7, fp32=66.9)),
    (r"\bA100\b", "A100", dict(bf16=312, fp16=312, tf32=156, fp32=19.5)),
    (r"\bA10\b", "A10", dict(bf16=125, fp16=125, tf32=62.5, fp32=31.2)),
    (r"\bA40\b", "A40", dict(bf16=149.7, fp16=149.7, tf32=74.8, fp32=37.4)),
    (r"\bA6000\b", "RTX A6000", dict(bf16=154.8, fp16=154.8, tf32=77.4, fp32=38.7)),
    (r"\bL40S\b", "L40S", dict(bf16=362, fp16=362, tf32=183, fp32=91.6)),
    (r"\bL40\b", "L40", dict(bf16=181, fp16=181, tf32=90.5, fp32=90.5)),
    (r"\bL4\b", "L4", dict(bf16=121, fp16=121, tf32=60, fp32=30.3)),
    (r"\bRTX 4090\b", "RTX 4090", dict(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6)),
    (r"\bRTX 3090\b(?! TI)", "RTX 3090", dict(bf16=71, fp16=71, tf32=35.6, fp32=35.6)),
    (r"\bV100S\b", "V100S PCIe", dict(bf16=None, fp16=130, tf32=None, fp32=16.4)),
    (r"\bV100\b.*\bSXM", "V100 SXM2", dict(bf16=None, fp16=125, tf32=None, fp32=15.7)),
    (r"\bV100\b", "V100 PCIe", dict(bf16=None, fp16=112, tf32=None, fp32=14)),
    (r"\bT4\b", "T4", dict(bf16=None, fp16=65, tf32=None, fp32=8.1)),
]
_DTYPE_KEY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def gpu_model(device_name: str) -> tuple[str, dict[str, float | None]] | None:
    """The table row of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100 SXM"), or None."""
    name = device_name.upper().replace("-", " ").replace("_", " ")
    for pattern, canonical, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            return canonical, peaks
    return None


def peak_flops_for(device_name: str, dtype: torch.dtype, tf32: bool = True) -> float | None:
    """Peak FLOP/s of a CUDA device in a compute dtype (fp32 with TF32 on: the TF32 rate where the
    device has one); None for an unknown device or a dtype it does not run natively."""
    row = gpu_model(device_name)
    if row is None:
        return None
    peaks = row[1]
    key = _DTYPE_KEY[dtype]
    value = peaks.get("tf32") if key == "fp32" and tf32 and peaks.get("tf32") else peaks.get(key)
    return value * 1e12 if value else None


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores, through the current API only: mixing it
    with the legacy allow_tf32 flags warns, and makes torch.get_float32_matmul_precision() raise."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.conv.fp32_precision = "tf32"


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

    @property
    def dtype_name(self) -> str:
        """fp32, bf16 or fp16: the name --dtype takes."""
        return _DTYPE_KEY[self.dtype]

    def describe(self) -> str:
        name = self.device.type
        if self.device.type == "cuda":
            name = f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"device {name}, dtype {self.dtype_name}, compile {'on' if self.compile else 'off'}"

    def peak_flops(self) -> float | None:
        """The device's peak FLOP/s in the chosen dtype where known, for MFU; None otherwise."""
        if self.device.type != "cuda":
            return None
        tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"
        return peak_flops_for(torch.cuda.get_device_name(self.device), self.dtype, tf32=tf32)

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


def native_bf16_matmul(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively on `device` rather than emulated: CUDA GPUs with bf16
    (Ampere on), CPUs whose oneDNN has a bf16 path (AVX-512 or AMX); other devices as torch has it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN: assume emulation
            return False
    return True


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
        enable_tf32()
    dt = pick_dtype(dev, dtype)
    if compile is None:
        compile = dev.type == "cuda"
    return Runtime(device=dev, dtype=dt, compile=compile)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_host_memory() -> bool:
    """Keep freed host memory in the process for the next training step, on Linux with glibc.

    glibc serves large blocks (above its mmap threshold, 128 KiB to 32 MiB) with fresh mappings and
    unmaps them when freed, so every CPU training step faults in and zeroes its gradients, logits and
    activations anew: 160,000 page faults and 0.3 s of system time a step at gpt2, B=4, T=128.
    With the mmap threshold at 1 GiB and trimming off, the freed blocks stay in the heap and are
    reused. What is computed does not change; the process's resident memory stays at its peak.
    Returns whether it was applied (not elsewhere: other C libraries, macOS, Windows)."""
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
