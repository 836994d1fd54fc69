"""Model FLOPs for throughput and MFU (model FLOPs utilisation), counted as torchtitan and PaLM count them.

Per token of a training step: 6 x non-embedding parameters (HF's `floating_point_ops`, which
`total_flos` keeps, so it agrees with the HF Trainer's) plus the attention scores and their use,
12 x layers x hidden x sequence length (PaLM, appendix B), forward and backward. Padding counts, as the
device computes it. Peaks are dense bf16 tensor-core peaks (what MFU is quoted against); `peak_tflops`
replaces them (e.g. for another dtype, or a GPU not listed).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

# dense bf16 TFLOP/s by device name, as torchtitan's table; the first listed substring that matches wins
PEAK_BF16_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
                    ("MI355X", 2500.0), ("MI325X", 1300.0), ("MI300X", 1300.0))


def attention_flops(model: torch.nn.Module, inputs: dict[str, Any], main_input: str) -> float:
    """What 6 x N x tokens leaves out: 12 x layers x hidden x sequence length per token."""
    config = getattr(model, "config", None)
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    ids = inputs.get(main_input)
    if not layers or not hidden or not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return 0.0
    return 12.0 * layers * hidden * ids.shape[-1] * ids.numel()


def peak_tflops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    """Peak TFLOP/s of one device: the configured value, or the table's for a known GPU, else None."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def throughput_logs(flops_per_rank: float, seconds: float, peak: Optional[float], prefix: str = "train_"
                    ) -> dict[str, float]:
    """TFLOP/s per rank, and MFU in percent where the peak is known."""
    tflops = flops_per_rank / max(seconds, 1e-9) / 1e12
    logs = {f"{prefix}tflops_per_rank": tflops}
    if peak:
        logs[f"{prefix}mfu"] = 100.0 * tflops / peak
    return logs


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak device memory: the CUDA allocator's peak, or on CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
