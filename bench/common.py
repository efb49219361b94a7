"""What every benchmark shares: the JSON-lines record and peak-memory readings."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def emit(bench: str, metric: str, value: float, unit: str, config: dict[str, Any]) -> None:
    print(json.dumps({"bench": bench, "metric": metric, "value": round(float(value), 4), "unit": unit, "config": config}),
          flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
