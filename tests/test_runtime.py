"""Runtime: the MFU peak table (exact device names, a peak per dtype) and TF32 through the current API."""

import warnings

import pytest
import torch

from gptlab.runtime import enable_tf32, gpu_model, peak_flops_for

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA L40S", "L40S"),
    ("Tesla T4", "T4"),
    ("Tesla V100-SXM2-16GB", "V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "V100 PCIe"),
    ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"),
])
def test_exact_device_names(name, model):
    assert gpu_model(name)[0] == model


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce GTX 1080",
                                  "AMD Instinct MI300X", ""])
def test_unknown_devices_have_no_peak(name):
    """A near miss is not a match: no MFU is better than a wrong one."""
    assert gpu_model(name) is None
    assert peak_flops_for(name, BF16) is None


def test_l4_l40_l40s_differ():
    peaks = {n: peak_flops_for(n, BF16) for n in ("NVIDIA L4", "NVIDIA L40", "NVIDIA L40S")}
    assert peaks == {"NVIDIA L4": 121e12, "NVIDIA L40": 181e12, "NVIDIA L40S": 362e12}


def test_a_peak_per_dtype():
    # TF32 on A100/H100: fp32 matmuls run at the TF32 tensor-core rate, half of bf16 there
    assert peak_flops_for("NVIDIA A100-SXM4-40GB", FP32) == 156e12
    assert peak_flops_for("NVIDIA A100-SXM4-40GB", FP32, tf32=False) == 19.5e12
    assert peak_flops_for("NVIDIA H100 80GB HBM3", BF16) == 989e12
    assert peak_flops_for("NVIDIA H100 80GB HBM3", FP32) == pytest.approx(494.7e12)
    # V100 and T4: no TF32, so fp32 is the CUDA-core rate, nowhere near half of fp16; no native bf16
    assert peak_flops_for("Tesla V100-SXM2-16GB", FP16) == 125e12
    assert peak_flops_for("Tesla V100-SXM2-16GB", FP32) == 15.7e12
    assert peak_flops_for("Tesla V100-SXM2-16GB", BF16) is None
    assert peak_flops_for("Tesla T4", FP16) == 65e12
    assert peak_flops_for("Tesla T4", FP32) == pytest.approx(8.1e12)
    assert peak_flops_for("Tesla T4", BF16) is None


def test_tf32_set_through_the_current_api_without_warnings():
    old_matmul = torch.backends.cuda.matmul.fp32_precision
    old_conv = torch.backends.cudnn.conv.fp32_precision
    old_mkldnn = torch.backends.mkldnn.matmul.fp32_precision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            enable_tf32()
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
            assert torch.backends.cudnn.conv.fp32_precision == "tf32"
            # the legacy query still answers (it raises when the old and new APIs were mixed),
            # which torch.compile's autotuning relies on
            assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.fp32_precision = old_matmul
        torch.backends.cudnn.conv.fp32_precision = old_conv
        torch.backends.mkldnn.matmul.fp32_precision = old_mkldnn


def test_runtime_sources_use_no_deprecated_tf32_flags():
    import inspect

    import gptlab.runtime

    src = inspect.getsource(gptlab.runtime)
    assert ".allow_tf32 =" not in src


def test_freed_host_memory_is_reused_on_glibc():
    """The mallopt thresholds are raised where glibc is the C library; nothing is tried elsewhere."""
    import platform
    import sys

    from gptlab.runtime import reuse_freed_host_memory

    applied = reuse_freed_host_memory()
    assert applied == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
