"""Peak memory of a training worker, the figure the SCFT metrics and the ZeRO benchmarks report."""
from __future__ import annotations

from pathlib import Path

import torch


class PeakMemory:
    """Peak memory of this worker since the last reset.

    GPU: the peak of torch's allocations. CPU: the peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set at construction (before the model is loaded), so
    the constant cost of Python, torch and Ray is left out and what remains is model, gradients,
    optimizer state, activations and DeepSpeed's buffers.
    """

    def __init__(self, use_gpu: bool):
        self.use_gpu = use_gpu
        self.baseline_mb = 0.0 if use_gpu else _proc_status_mb("VmRSS")
        self.reset()

    def reset(self) -> None:
        if self.use_gpu:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.use_gpu:
            return torch.cuda.max_memory_allocated() / 2**20
        return _proc_status_mb("VmHWM") - self.baseline_mb


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
