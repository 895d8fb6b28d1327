"""How sure a number is: 95 % percentile bootstrap intervals of accuracy, and paired win probabilities.

The draws depend only on ``SEED`` and each task's number of rows, so runs scored on the same rows are paired;
the average's resample is the mean of the tasks' resamples of the same draw (docs/sweeps.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
_CHUNK = 50  # resamples drawn at once: 50 x 40,430 QQP rows = 16 MB of indices


def encode_correct(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"rows", "ids_sha256", "correct"}`` of prediction rows sorted by ``idx``: a short hash of their ids (runs
    are paired only on equal hashes) and their correctness as packed bits in base64."""
    rows = sorted(rows, key=lambda row: row["idx"])
    correct = np.array([row["prediction"] == row["label"] for row in rows], dtype=bool)
    return {
        "rows": len(rows),
        "ids_sha256": hashlib.sha256(json.dumps([int(row["idx"]) for row in rows]).encode()).hexdigest()[:16],
        "correct": base64.b64encode(np.packbits(correct).tobytes()).decode("ascii"),
    }


def decode_correct(entry: Mapping[str, Any]) -> Tensor:
    """The boolean correctness vector ``encode_correct`` stored."""
    packed = np.frombuffer(base64.b64decode(entry["correct"]), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(packed)[: int(entry["rows"])].astype(bool))


def bootstrap(correct: Mapping[str, Tensor], resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Tensor]:
    """Resampled accuracies ``{entry: [resamples]}`` of ``correct`` (entry -> boolean vector), and their ``average``."""
    if not correct:
        raise ValueError("bootstrap needs at least one task's per-example correctness")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for entry, values in correct.items():
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        n = values.numel()
        if n == 0:
            raise ValueError(f"bootstrap: {entry!r} has no scored example")
        parts = []
        for start in range(0, resamples, _CHUNK):
            draws = torch.randint(n, (min(_CHUNK, resamples - start), n), generator=generator)
            parts.append(torch.take(values, draws).mean(dim=1))
        out[entry] = torch.cat(parts)
    out["average"] = torch.stack([out[entry] for entry in correct]).mean(dim=0)
    return out


def interval(resampled: Tensor, level: float = LEVEL) -> list[float]:
    """``[low, high]``: the central ``level`` quantiles of resampled values."""
    tail = (1.0 - level) / 2
    return torch.quantile(resampled, torch.tensor([tail, 1.0 - tail], dtype=resampled.dtype)).tolist()


def intervals(correct: Mapping[str, Tensor], resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, list[float]]:
    """``{entry: [low, high], "average": [low, high]}`` of accuracy (``correct``: the averaged tasks)."""
    return {entry: interval(values) for entry, values in bootstrap(correct, resamples, seed).items()}


def uncertainty_entry(per_example: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], resamples: int = RESAMPLES,
                      seed: int = SEED) -> dict[str, Any]:
    """The report's ``protocol.uncertainty``: intervals of ``tasks`` and their average (one bootstrap), and of each
    other entry of ``per_example`` (``mnli_mismatched``) on its own."""
    averaged = {task: decode_correct(per_example[task]) for task in tasks}
    accuracy = intervals(averaged, resamples, seed)
    for entry, stored in per_example.items():
        if entry not in averaged:
            accuracy[entry] = intervals({entry: decode_correct(stored)}, resamples, seed)[entry]
    return {"method": "percentile bootstrap over examples", "level": LEVEL, "resamples": resamples, "seed": seed,
            "accuracy": accuracy}


def win_probability(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """P(``a``'s average > ``b``'s) over paired ``bootstrap`` resamples; a tie counts one half."""
    wins = (a["average"] > b["average"]).double().mean() + 0.5 * (a["average"] == b["average"]).double().mean()
    return float(wins)
