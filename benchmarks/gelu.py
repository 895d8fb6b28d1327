"""Fused GELU vs transformers' NewGELUActivation: max logit difference, argmax equality, forward time ratio.

    python benchmarks/gelu.py --config /tmp/mergelit_bench/eval/config_0.01.yaml   # benchmark data (eval.py writes it)
    python benchmarks/gelu.py --config tests/.../config.yaml                        # any `mergelit test` config

Each task's fine-tuned body and head (the ``individual`` model) scores that task's evaluation rows
twice in one process: ``build_body(..., fused_gelu=False)`` (the default) and ``fused_gelu=True``
(``gelu(x, approximate="tanh")``). Prints per task the max |Δ logit|, whether every argmax agrees,
and the forward-time ratio default / fused.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = parser.parse_args()
    import yaml

    from mergelit.glue import GLUEDataModule
    from mergelit.gpt2 import build_body, build_head, last_non_pad_index
    from mergelit.pool import ModelPool

    torch.set_num_threads(args.threads)
    with open(args.config) as file:
        config = yaml.safe_load(file)
    pool = ModelPool(**config["pool"])
    data = config.get("data", {})
    datamodule = GLUEDataModule(tasks=pool.tasks, tokenizer=pool.tokenizer_path, path=data["path"],
                                batch_size=data.get("batch_size", 32),
                                cache_dir=data.get("cache_dir", "lightning_logs/cache/tokenized"))
    totals = {False: 0.0, True: 0.0}
    worst, all_same, rows = 0.0, True, 0
    print(f"{'task':6} {'rows':>6} {'max |Δ logit|':>14} {'argmax equal':>12}")
    for task in pool.tasks:
        head = build_head(pool.head(task))
        pad = pool.task_config(task).pad_token_id
        logits = {}
        for fused in (False, True):
            body = build_body(pool.body_config(), pool.finetuned_body(task), fused_gelu=fused)
            out = []
            start = time.perf_counter()
            with torch.inference_mode():
                for batch in datamodule.eval_dataloader(task):
                    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
                    last = last_non_pad_index(batch["input_ids"], pad)
                    out.append(head(hidden[torch.arange(hidden.shape[0]), last]))
            totals[fused] += time.perf_counter() - start
            logits[fused] = torch.cat(out)
        diff = float((logits[True] - logits[False]).abs().max())
        same = bool((logits[True].argmax(-1) == logits[False].argmax(-1)).all())
        worst, all_same, rows = max(worst, diff), all_same and same, rows + len(logits[False])
        print(f"{task:6} {len(logits[False]):6d} {diff:14.3g} {str(same):>12}", flush=True)
    print(json.dumps({"rows": rows, "max_abs_logit_diff": worst, "argmax_identical": all_same,
                      "forward_seconds_default": totals[False], "forward_seconds_fused": totals[True],
                      "ratio_default_over_fused": totals[False] / totals[True]}))


if __name__ == "__main__":
    main()
