"""How sure a number is: bootstrap intervals of accuracy and paired win probabilities.

RTE has 277 validation rows: a one-point difference there is about three examples. Every report
therefore carries, beside each accuracy, a **95 % percentile bootstrap interval**, and ``compare``
can say how often one run beats another on the same examples.

- **Resampling.** Each task's scored examples are drawn with replacement, as many as it has,
  ``RESAMPLES`` times, from one ``torch.Generator`` seeded with ``SEED``, task after task in the
  report's task order. A resample's accuracy is the mean correctness of its draws; the average's
  resample is the unweighted mean of the tasks' resamples *of the same draw*, so the average's
  interval comes from the same resamples as the tasks'. The interval is the 2.5 % and 97.5 %
  quantiles (linear interpolation) of the resampled accuracies.
- **Paired.** The draws depend only on the seed and the number of examples of each task, so two
  runs scored on the same rows get the same draws: resample b picks the same examples for both.
  ``win_probability(a, b)`` is the fraction of resamples in which ``a``'s average beats ``b``'s
  (a tie counts one half). It needs both runs' per-example correctness on identical rows.
- **Stored.** A report keeps what the bootstrap needs, compactly: per entry, the number of rows,
  a hash of their ids and the correctness bits (packed, base64) in id order
  (``protocol.per_example``), and the intervals themselves (``protocol.uncertainty``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

RESAMPLES = 1000
"""Bootstrap resamples per interval and per win probability."""

SEED = 0
"""Seed of the resampling generator (the same draws for every report scored on the same rows)."""

LEVEL = 0.95
"""Coverage of the intervals."""

_CHUNK = 50  # resamples drawn at once: 50 x 40,430 QQP rows = 16 MB of indices


# ---- per-example correctness, stored compactly ------------------------------------------------
def ids_hash(ids: Sequence[int]) -> str:
    """A short hash of the example ids a run scored (runs are paired only on equal hashes)."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:16]


def encode_correct(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"rows", "ids_sha256", "correct"}`` of prediction rows (``idx``, ``label``, ``prediction``),
    sorted by ``idx``: the correctness as packed bits in base64 (about 1.4 characters per 8 rows)."""
    import numpy as np

    rows = sorted(rows, key=lambda row: row["idx"])
    correct = np.array([row["prediction"] == row["label"] for row in rows], dtype=bool)
    return {
        "rows": len(rows),
        "ids_sha256": ids_hash([row["idx"] for row in rows]),
        "correct": base64.b64encode(np.packbits(correct).tobytes()).decode("ascii"),
    }


def decode_correct(entry: Mapping[str, Any]) -> Tensor:
    """The boolean correctness vector ``encode_correct`` stored."""
    import numpy as np

    packed = np.frombuffer(base64.b64decode(entry["correct"]), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(packed)[: int(entry["rows"])].astype(bool))


# ---- the bootstrap ---------------------------------------------------------------------------
def bootstrap(correct: Mapping[str, Tensor], resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Tensor]:
    """Resampled accuracies, ``{entry: [resamples]}`` float64, plus ``average`` (the mean over every
    given entry of the same resample). ``correct`` maps entry -> boolean vector, in report order."""
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
    low, high = torch.quantile(resampled, torch.tensor([tail, 1.0 - tail], dtype=resampled.dtype)).tolist()
    return [low, high]


def intervals(correct: Mapping[str, Tensor], resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, list[float]]:
    """``{entry: [low, high], "average": [low, high]}`` of accuracy (``correct``: the averaged tasks)."""
    return {entry: interval(values) for entry, values in bootstrap(correct, resamples, seed).items()}


def uncertainty_entry(
    per_example: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, Any]:
    """The report's ``protocol.uncertainty``: accuracy intervals of ``tasks`` and their average (one
    bootstrap), and of each other entry of ``per_example`` (``mnli_mismatched``) on its own."""
    averaged = {task: decode_correct(per_example[task]) for task in tasks}
    accuracy = intervals(averaged, resamples, seed)
    for entry, stored in per_example.items():
        if entry not in averaged:
            accuracy[entry] = intervals({entry: decode_correct(stored)}, resamples, seed)[entry]
    return {"method": "percentile bootstrap over examples", "level": LEVEL, "resamples": resamples, "seed": seed,
            "accuracy": accuracy}


def win_probability(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """P(``a``'s average > ``b``'s) over paired resamples (``bootstrap`` outputs of the same tasks,
    rows, seed and resample count); a tie counts one half."""
    wins = (a["average"] > b["average"]).double().mean() + 0.5 * (a["average"] == b["average"]).double().mean()
    return float(wins)
