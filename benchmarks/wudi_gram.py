"""WUDI's Gram-form gradient against FusionBench's autograd order: the drift after 400 steps, and the
time of the whole GPT-2-small merge on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/wudi_gram.py drift               # c_fc [768, 3072], 7 tasks, 400 steps (≈ 30 min: autograd)
    OMP_NUM_THREADS=1 python benchmarks/wudi_gram.py drift --fixtures    # the test fixtures' pool (2 layers, 64 wide), both sides
    OMP_NUM_THREADS=1 python benchmarks/wudi_gram.py merge               # GPT-2 small, 7 tasks, 400 steps, input side (≈ 2 h here)
    OMP_NUM_THREADS=1 python benchmarks/wudi_gram.py merge --steps 20    # fewer steps: the 400-step time extrapolated
    OMP_NUM_THREADS=1 python benchmarks/wudi_gram.py merge --layers 1 --wte-steps 4   # 400 steps on one block (× 12), wte extrapolated
    OMP_NUM_THREADS=1 python benchmarks/wudi_gram.py step                # c_fc: CPU s per Adam step, gram vs autograd

``drift``: one key's merged weights after ``--steps`` Adam steps with ``gradient: gram`` and with
``gradient: autograd`` (FusionBench's iterates on CPU), from the same θ0 and θi: max |difference|
(absolute), how far Adam moved the weights (max |θ* − θ0 − Σ τi|), both times and their ratio.
Random weights of GPT-2 small's scale: θ0 = 0.02·N(0, 1), τi = 1e-3·(0.5 + ui)·N(0, 1), ui ~ U(0, 1)
per task (task vectors of different norms). ``--fixtures``: the same comparison on every key of the
tests' pool (``mergelit.synthetic.write_fixtures``, seed 0), on both sides (``fusionbench`` excludes
wte, as FusionBench must).

``step``: one key (``--shape``, c_fc by default): CPU seconds per Adam step of each gradient, from
the time of 1 and of 1 + k steps (k = ``--baseline-steps`` for autograd, 40 for gram), and each
path's 400-step time extrapolated from them.

``merge``: every key of GPT-2 small (wte [50257, 768], wpe [1024, 768], 12 blocks, ln_f) merged by
``wudi_merge_tensor`` as ``WUDIMerging`` does, with ``gradient: gram`` (the default: the Gram form
on every tensor but wte, which keeps the autograd order), key by key on random weights as above,
timed per key; then FusionBench's autograd order on wte, wpe and one block, its time per step
taken from ``--baseline-steps`` extra steps (so that stacking the task vectors, done once, drops
out), extrapolated to 12 blocks and 400 steps. With ``--steps`` below 400 the Gram time is
extrapolated as time × 400 / steps (an upper bound: its one-off precomputation counts in every
step's share).

One run, not a distribution: the host is shared and noisy. Wall and process CPU seconds are both
printed; threads are torch's (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from mergelit.methods.wudi import wudi_merge_tensor

FULL_STEPS = 400  # FusionBench's wudi.yaml
LAYERS, WIDTH, VOCAB, POSITIONS, TASKS = 12, 768, 50257, 1024, 7


def gpt2_small_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """GPT2Model's state-dict shapes in state-dict order (Conv1D weights [in, out])."""
    d = WIDTH
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (VOCAB, d), "wpe.weight": (POSITIONS, d)}
    for layer in range(layers):
        block = {
            "ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,),
        }  # fmt: skip
        shapes.update({f"h.{layer}.{name}": shape for name, shape in block.items()})
    shapes["ln_f.weight"], shapes["ln_f.bias"] = (d,), (d,)
    return shapes


def random_key(shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """θ0 and θ1..θn of one key at GPT-2 small's scale (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=generator).mul_(0.02)
    scales = 1e-3 * (0.5 + torch.rand(n, generator=generator))
    return theta0, [torch.randn(shape, generator=generator).mul_(float(s)).add_(theta0) for s in scales]


def timed(function):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def merge_key(theta0, thetas, steps: int, gradient: str, side: str = "input") -> torch.Tensor:
    return wudi_merge_tensor(theta0, thetas, True, steps, 1e-5, side, "adam", gradient)


# ---- drift ---------------------------------------------------------------------------------------


def drift_on_key(shape: tuple[int, int], steps: int) -> None:
    theta0, thetas = random_key(shape, TASKS, seed=0)
    start = merge_key(theta0, thetas, 0, "autograd")
    gram, gram_s, gram_cpu = timed(lambda: merge_key(theta0, thetas, steps, "gram"))
    reference, ref_s, ref_cpu = timed(lambda: merge_key(theta0, thetas, steps, "autograd"))
    print(
        f"key {list(shape)} (input side), n = {TASKS}, {steps} steps: max |gram − autograd| = "
        f"{(gram - reference).abs().max().item():.2e} (absolute); Adam moved the weights by up to "
        f"{(reference - start).abs().max().item():.2e}\n"
        f"  autograd {ref_s:.1f} s ({ref_cpu:.1f} s CPU), gram {gram_s:.1f} s ({gram_cpu:.1f} s CPU): "
        f"{ref_s / gram_s:.1f}× faster",
        flush=True,
    )


def drift_on_fixtures(steps: int) -> None:
    import yaml

    from mergelit.methods.wudi import wudi_merge
    from mergelit.pool import ModelPool
    from mergelit.synthetic import write_fixtures

    root = Path(tempfile.mkdtemp(prefix="wudi-fixtures-"))
    pool = ModelPool(**yaml.safe_load(write_fixtures(root, seed=0).read_text())["pool"])
    pretrained, finetuned = pool.pretrained_body(), pool.finetuned_bodies()
    for side, excluded in (("input", []), ("fusionbench", ["wte.weight"])):
        runs = {}
        for gradient in ("gram", "autograd"):
            runs[gradient], seconds, _ = timed(
                lambda: wudi_merge(pretrained, finetuned, steps, side=side, gradient=gradient, exclude_keys=excluded, progress=False)
            )
            runs[gradient + " s"] = seconds
        worst_key = max(pretrained, key=lambda k: (runs["gram"][k] - runs["autograd"][k]).abs().max().item())
        worst = (runs["gram"][worst_key] - runs["autograd"][worst_key]).abs().max().item()
        print(
            f"fixtures ({len(finetuned)} tasks, 2 layers, 64 wide), side {side}, {steps} steps: max |gram − autograd| = "
            f"{worst:.2e} (absolute, {worst_key}); autograd {runs['autograd s']:.1f} s, gram {runs['gram s']:.1f} s",
            flush=True,
        )


# ---- one key, per step ----------------------------------------------------------------------------


def per_step(shape: tuple[int, int], steps: int, gram_steps: int) -> None:
    """CPU seconds per Adam step of each gradient on one key: (time of 1 + k steps − time of 1 step) / k,
    so that the one-off work (stacking, the Gram sums) drops out; and each path's 400-step time."""
    theta0, thetas = random_key(shape, TASKS, seed=0)
    figures = {}
    for gradient, k in (("gram", gram_steps), ("autograd", steps)):
        _, _, one = timed(lambda: merge_key(theta0, thetas, 1, gradient))
        _, _, more = timed(lambda: merge_key(theta0, thetas, 1 + k, gradient))
        figures[gradient] = (one, (more - one) / k)
    (g_one, g_step), (a_one, a_step) = figures["gram"], figures["autograd"]
    print(
        f"key {list(shape)} (input side), n = {TASKS}: per Adam step {a_step:.3f} s CPU autograd ({steps} steps timed), "
        f"{g_step:.4f} s CPU gram ({gram_steps} steps timed): {a_step / g_step:.0f}× per step; one step including the "
        f"one-off work: autograd {a_one:.2f} s, gram {g_one:.2f} s; {FULL_STEPS} steps extrapolated: autograd "
        f"{a_one + (FULL_STEPS - 1) * a_step:.0f} s CPU, gram {g_one + (FULL_STEPS - 1) * g_step:.1f} s CPU",
        flush=True,
    )


# ---- the whole merge -----------------------------------------------------------------------------


def _group(key: str) -> str:
    return key.split(".")[0] if not key.startswith("h.") else "blocks"


def whole_merge(steps: int, baseline_steps: int, layers: int = LAYERS, wte_steps: int = 0) -> None:
    shapes = gpt2_small_shapes()
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for index, (key, shape) in enumerate(shapes.items()):
        if key.startswith("h.") and int(key.split(".")[1]) >= layers:
            continue
        theta0, thetas = random_key(shape, TASKS, seed=index)
        if key == "wte.weight" and 0 < wte_steps < steps:
            # wte keeps the autograd order (the Gram form cannot lower it): its time for ``steps`` steps
            # from that of 1 and 1 + wte_steps steps (the one-off stacking drops out of the per-step share).
            _, wall_one, one = timed(lambda: wudi_merge_tensor(theta0, thetas, True, 1, 1e-5))
            _, wall_more, more = timed(lambda: wudi_merge_tensor(theta0, thetas, True, 1 + wte_steps, 1e-5))
            cpu[key] = one + (steps - 1) * (more - one) / wte_steps
            seconds[key] = wall_one + (steps - 1) * (wall_more - wall_one) / wte_steps
            print(f"  wte: {steps} steps extrapolated from 1 and {1 + wte_steps} steps: {cpu[key]:.0f} s CPU", flush=True)
        else:
            _, seconds[key], cpu[key] = timed(lambda: wudi_merge_tensor(theta0, thetas, len(shape) == 2, steps, 1e-5))
        del theta0, thetas
    if layers < LAYERS:  # the blocks timed stand for all 12 (every block has the same shapes)
        for table in (seconds, cpu):
            for key in [k for k in table if k.startswith("h.")]:
                table[key] *= LAYERS / layers
        print(f"  {layers} block(s) timed, their time × {LAYERS / layers:g} for the 12 blocks", flush=True)
    scale = FULL_STEPS / steps
    total, total_cpu = sum(seconds.values()), sum(cpu.values())
    groups = {}
    for key, value in seconds.items():
        groups[_group(key)] = groups.get(_group(key), 0.0) + value
    print(
        f"GPT-2 small, n = {TASKS}, input side, gradient gram, {steps} steps, {torch.get_num_threads()} thread(s): "
        f"{total:.0f} s wall ({total_cpu:.0f} s CPU) = {total / 60:.1f} min; "
        + ", ".join(f"{name} {value:.0f} s" for name, value in groups.items()),
        flush=True,
    )
    if steps != FULL_STEPS:
        print(f"  extrapolated to {FULL_STEPS} steps (upper bound): {total * scale / 60:.1f} min wall, {total_cpu * scale / 60:.1f} min CPU")
    gram_400 = total_cpu * scale
    if baseline_steps:
        # FusionBench's autograd order on wte, wpe and one block, per step: the time of 1 + k steps
        # minus that of 1 step, over k (what stacking the task vectors costs once drops out), then
        # extrapolated to 12 blocks and 400 steps.
        baseline = 0.0
        for index, (key, shape) in enumerate(shapes.items()):
            if len(shape) != 2 or (key.startswith("h.") and not key.startswith("h.0.")):
                continue
            theta0, thetas = random_key(shape, TASKS, seed=index)
            _, _, one = timed(lambda: merge_key(theta0, thetas, 1, "autograd"))
            _, _, more = timed(lambda: merge_key(theta0, thetas, 1 + baseline_steps, "autograd"))
            per_step = (more - one) / baseline_steps
            baseline += (one + (FULL_STEPS - 1) * per_step) * (LAYERS if key.startswith("h.") else 1)
            del theta0, thetas
        print(
            f"  autograd (FusionBench's order), per-step time from {baseline_steps} extra step(s) on wte, wpe and one block, "
            f"extrapolated to 12 blocks and {FULL_STEPS} steps: {baseline / 3600:.1f} h CPU; "
            f"the Gram form is {baseline / gram_400:.1f}× faster",
            flush=True,
        )
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["drift", "merge", "step"])
    parser.add_argument("--steps", type=int, default=FULL_STEPS, help="Adam steps (default 400)")
    parser.add_argument("--shape", type=int, nargs=2, default=[WIDTH, 4 * WIDTH], help="drift: the stored key shape (default c_fc [768, 3072])")
    parser.add_argument("--fixtures", action="store_true", help="drift: also every key of the tests' pool, both sides")
    parser.add_argument("--baseline-steps", type=int, default=3, help="merge: extra autograd steps timed for the speed-up (0: none)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="merge: blocks timed (their time scaled to 12 blocks)")
    parser.add_argument("--wte-steps", type=int, default=0, help="merge: time wte from 1 and 1 + this many steps, extrapolated (0: all steps)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.what == "step":
        per_step(tuple(args.shape), args.baseline_steps, 40)
    elif args.what == "drift":
        if args.fixtures:
            drift_on_fixtures(args.steps)
        drift_on_key(tuple(args.shape), args.steps)
    else:
        whole_merge(args.steps, args.baseline_steps, args.layers, args.wte_steps)


if __name__ == "__main__":
    main()
