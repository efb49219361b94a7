"""What every benchmark shares: the JSON-lines record, peak-memory readings, device sync and label.

torch is imported inside the functions: bench_extract's parent process imports this module without it.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def emit(bench: str, metric: str, value: float, unit: str, config: dict[str, Any]) -> None:
    print(json.dumps({"bench": bench, "metric": metric, "value": round(float(value), 4), "unit": unit, "config": config}),
          flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer read after it covers the work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU with its thread count."""
    import torch

    return torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds of `steps` calls of `step` (warm-up calls done by the caller), CUDA's peak memory counted from here."""
    import time

    import torch

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def emit_steps(bench: str, batch: int, steps: int, seconds: float, device: torch.device, config: dict[str, Any]) -> None:
    """A step benchmark's records: images/s, step time, and peak memory (CUDA's on GPU, the process's RSS on CPU)."""
    import torch

    emit(bench, "images_per_s", batch * steps / seconds, "images/s", config)
    emit(bench, "step_time", seconds / steps, "s", config)
    if device.type == "cuda":
        emit(bench, "peak_memory", torch.cuda.max_memory_allocated() / 2**30, "GiB", config)
    else:
        emit(bench, "peak_rss", peak_rss_mib(), "MiB", config)
