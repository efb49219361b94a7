"""What every benchmark shares: the JSON-lines record, peak-memory readings, device sync and label.

torch is imported inside the functions: bench_extract's parent process imports this module without it.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
