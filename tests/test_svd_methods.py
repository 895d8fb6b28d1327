"""TSV-M, Iso-C, Iso-CTS and CART (the data-free SVD methods): hand cases and invariants of the maths
on hand-sized tensors (one task, orthogonal task vectors, transposition, f = 1, ρ = 1, λ = 0, from
the spec), and the classes, merging a real tiny pool key by key, against the whole-body functions.
"""

import math
import warnings

import pytest
import torch

import mergelit.methods.cart as cart_module
import mergelit.methods.iso as iso_module
import mergelit.methods.tsv_merging as tsv_module
from mergelit.errors import MergelitError
from mergelit.gpt2 import is_conv1d_weight
from mergelit.linalg import IllPosedMergeWarning, TaskVectors, low_rank, ordered_sum, running_mean
from mergelit.methods.cart import CART, cart_components, cart_merge, cart_rank
from mergelit.methods.iso import (
    IsoC,
    IsoCTS,
    iso_c_merge,
    iso_c_merge_tensor,
    iso_cts_merge,
    iso_cts_merge_tensor,
    iso_cts_sizes,
)
from mergelit.methods.simple_average import simple_average_merge
from mergelit.methods.tsv_merging import TaskSingularVectorMerging, tsv_merge, tsv_merge_tensor
from mergelit.pool import ModelPool
from mergelit.synthetic import write_pool

NO_ILL_POSED = pytest.mark.filterwarnings("error::mergelit.linalg.IllPosedMergeWarning")

# A 1-layer GPT-2 body, 4 wide, vocabulary 11, 6 positions; Conv1D weights stored [in, out].
SHAPES = {
    "wte.weight": (11, 4),
    "wpe.weight": (6, 4),
    "h.0.ln_1.weight": (4,),
    "h.0.ln_1.bias": (4,),
    "h.0.attn.c_attn.weight": (4, 12),
    "h.0.attn.c_attn.bias": (12,),
    "h.0.attn.c_proj.weight": (4, 4),
    "h.0.attn.c_proj.bias": (4,),
    "h.0.ln_2.weight": (4,),
    "h.0.ln_2.bias": (4,),
    "h.0.mlp.c_fc.weight": (4, 16),
    "h.0.mlp.c_fc.bias": (16,),
    "h.0.mlp.c_proj.weight": (16, 4),
    "h.0.mlp.c_proj.bias": (4,),
    "ln_f.weight": (4,),
    "ln_f.bias": (4,),
}
CONV1D = [key for key in SHAPES if is_conv1d_weight(key)]
TASKS = ["cola", "mrpc", "rte"]


def random_body(seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return {key: scale * torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}


def random_pool_bodies(num_tasks=3):
    """θ0 and task -> θ0 + 0.1·noise (dense task vectors: every 2-D τ has full rank)."""
    pretrained = random_body(0)
    finetuned = {}
    for i, task in enumerate(TASKS[:num_tasks]):
        noise = random_body(100 + i, scale=0.1)
        finetuned[task] = {key: pretrained[key] + noise[key] for key in SHAPES}
    return pretrained, finetuned


def plus(body, tau):
    return {key: body[key] + tau[key] for key in body}


def transposed(body):
    """Every 2-D tensor transposed (keys kept)."""
    return {key: t.T.contiguous() if t.dim() == 2 else t for key, t in body.items()}


def diag(*values):
    return torch.diag(torch.tensor(values, dtype=torch.float32))


def E(i, j, size=3):
    """The matrix unit e_i e_jᵀ."""
    unit = torch.zeros(size, size)
    unit[i, j] = 1.0
    return unit


def assert_close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def assert_bodies_close(actual, expected, atol=1e-5):
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=f"tensor {key!r}")


def orthonormal(rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q


# The three 1-D values used to pin the mean rule (θ0 = 0, so τi = θi exactly): FusionBench's running
# mean m ← a, m ← m + (b − m)/2, m ← m + (c − m)/3 and (a + b + c)/3 differ in the last bit here.
A, B, C = (torch.tensor([v], dtype=torch.float32) for v in (0.1, 0.2, 0.7))


def _running_mean_abc():
    m = A.clone()
    m = m + (B - m) / 2
    return m + (C - m) / 3


def one_d_bodies():
    pretrained = {"h.0.ln_1.weight": torch.zeros(1)}
    finetuned = {task: {"h.0.ln_1.weight": value} for task, value in zip(TASKS, (A, B, C))}
    return pretrained, finetuned


def test_the_running_mean_and_the_plain_mean_differ_on_the_pinning_values():
    assert not torch.equal(_running_mean_abc(), (A + B + C) / 3)


# ---- TSV-M ------------------------------------------------------------------------------------


@NO_ILL_POSED
def test_tsv_one_task_returns_the_finetuned_body():
    # n = 1: r = k, Û = U1 is already orthonormal, so τm = U1 diag(s1) V1ᵀ = τ1 (to SVD roundoff).
    pretrained, finetuned = random_pool_bodies(num_tasks=1)
    assert_bodies_close(tsv_merge(pretrained, finetuned, alpha=1), finetuned["cola"])


@NO_ILL_POSED
def test_tsv_orthogonal_low_rank_task_vectors_merge_to_their_sum():
    # 8 × 6, k = 6, n = 2: r = 3. τ1 and τ2 have rank 3 with mutually orthogonal column and row
    # spaces, so Û = [U1 U2] and V̂ are orthonormal already and τm = τ1 + τ2 (Task Arithmetic, λ = 1).
    left, right = orthonormal(8, 6, seed=1), orthonormal(6, 6, seed=2)
    tau1 = left[:, :3] @ diag(3.0, 2.0, 1.0) @ right[:, :3].T
    tau2 = left[:, 3:] @ diag(5.0, 4.0, 0.5) @ right[:, 3:].T
    assert_close(tsv_merge_tensor([tau1, tau2]), tau1 + tau2)


def test_tsv_hand_case_keeps_each_tasks_top_direction():
    # n = 2, k = 2, r = 1: τ1 = diag(3, 1) keeps (e1, 3, e1), τ2 = diag(1, 2) keeps (e2, 2, e2).
    # Û = [e1 e2], V̂ = [e1 e2] are orthonormal: τm = diag(3, 2). (Task Arithmetic: diag(4, 3).)
    pretrained = {"h.0.attn.c_proj.weight": diag(1.0, -1.0)}
    finetuned = {
        "cola": {"h.0.attn.c_proj.weight": diag(4.0, 0.0)},
        "mrpc": {"h.0.attn.c_proj.weight": diag(2.0, 1.0)},
    }
    assert_close(tsv_merge_tensor([diag(3.0, 1.0), diag(1.0, 2.0)]), diag(3.0, 2.0))
    merged = tsv_merge(pretrained, finetuned, alpha=0.5)  # θ0 + 0.5 diag(3, 2)
    assert_close(merged["h.0.attn.c_proj.weight"], diag(2.5, 0.0))


def test_tsv_keeps_int_k_over_n_directions_per_task():
    # k = 8, n = 3: r = int(8 · 1/3) = 2, slots 0..5 filled and 6, 7 left 0: τm has rank 6.
    generator = torch.Generator().manual_seed(3)
    taus = [torch.randn(10, 8, generator=generator) for _ in range(3)]
    assert torch.linalg.matrix_rank(tsv_merge_tensor(taus)).item() == 6


def test_tsv_one_d_keys_are_the_running_mean_times_alpha():
    pretrained, finetuned = one_d_bodies()
    merged = tsv_merge(pretrained, finetuned, alpha=1)
    assert torch.equal(merged["h.0.ln_1.weight"], _running_mean_abc())
    merged = tsv_merge(pretrained, finetuned, alpha=0.5)
    assert torch.equal(merged["h.0.ln_1.weight"], 0.5 * _running_mean_abc())


@NO_ILL_POSED
def test_tsv_transposing_every_matrix_transposes_the_output():
    # SVD transposes (U ↔ V), so the two polar factors swap: TSV-M is transpose-equivariant.
    pretrained, finetuned = random_pool_bodies()
    merged = tsv_merge(pretrained, finetuned)
    merged_t = tsv_merge(transposed(pretrained), {task: transposed(body) for task, body in finetuned.items()})
    assert_bodies_close(transposed(merged_t), merged)


@NO_ILL_POSED
def test_tsv_alpha_list_scales_each_task_vector_before_the_merge():
    pretrained, finetuned = random_pool_bodies()
    weights = [0.5, 2.0, -1.0]
    scaled = {
        task: {key: pretrained[key] + w * (body[key] - pretrained[key]) for key in body}
        for w, (task, body) in zip(weights, finetuned.items())
    }
    assert_bodies_close(tsv_merge(pretrained, finetuned, alpha=weights), tsv_merge(pretrained, scaled, alpha=1.0))


@NO_ILL_POSED
def test_tsv_alpha_number_scales_every_key():
    pretrained, finetuned = random_pool_bodies()
    one = tsv_merge(pretrained, finetuned, alpha=1.0)
    expected = {key: pretrained[key] + 0.3 * (one[key] - pretrained[key]) for key in one}
    assert_bodies_close(tsv_merge(pretrained, finetuned, alpha=0.3), expected)


@NO_ILL_POSED
def test_tsv_conv1d_only_averages_the_embeddings():
    pretrained, finetuned = random_pool_bodies()
    all_2d = tsv_merge(pretrained, finetuned, alpha=0.5)
    conv1d = tsv_merge(pretrained, finetuned, alpha=0.5, svd_keys="conv1d")
    excluded = tsv_merge(pretrained, finetuned, alpha=0.5, exclude_keys=["wte.weight", "wpe.weight"])
    assert_bodies_close(conv1d, excluded, atol=0)
    for key in ("wte.weight", "wpe.weight"):
        taus = [body[key] - pretrained[key] for body in finetuned.values()]
        m = taus[0] + (taus[1] - taus[0]) / 2
        m = m + (taus[2] - m) / 3
        assert torch.equal(conv1d[key], pretrained[key] + 0.5 * m)
        assert not torch.allclose(all_2d[key], conv1d[key])
    for key in CONV1D:
        assert torch.equal(conv1d[key], all_2d[key])


def test_tsv_warns_naming_a_rank_deficient_tensor_and_task():
    # wpe [6, 4]: k = 4, n = 2, r = 2; cola's τ_wpe has one non-zero row (rank 1 < 2).
    pretrained, finetuned = random_pool_bodies(num_tasks=2)
    finetuned["cola"]["wpe.weight"] = pretrained["wpe.weight"].clone()
    finetuned["cola"]["wpe.weight"][0] += 1.0
    with pytest.warns(IllPosedMergeWarning, match=r"TSV-M: 'wpe\.weight'.*cola \(rank 1\)") as record:
        tsv_merge(pretrained, finetuned)
    assert len(record) == 1  # one warning, for wpe only
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllPosedMergeWarning)
        tsv_merge(pretrained, finetuned, svd_keys="conv1d")  # wpe averaged: well-posed


def test_tsv_rejects_unknown_exclude_keys():
    pretrained, finetuned = random_pool_bodies()
    with pytest.raises(ValueError, match="exclude_keys.*'wpe'"):
        tsv_merge(pretrained, finetuned, exclude_keys=["wpe"])


def test_tsv_does_not_modify_its_inputs():
    pretrained, finetuned = random_pool_bodies()
    before = [{k: v.clone() for k, v in body.items()} for body in (pretrained, *finetuned.values())]
    tsv_merge(pretrained, finetuned, alpha=[1.0, 2.0, 3.0])
    for copy, body in zip(before, (pretrained, *finetuned.values())):
        assert_bodies_close(body, copy, atol=0)


# ---- Iso-C ------------------------------------------------------------------------------------


def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    generator = torch.Generator().manual_seed(4)
    taus = [torch.randn(5, 3, generator=generator) for _ in range(3)]
    expected = torch.linalg.svdvals(taus[0] + taus[1] + taus[2]).mean()
    s = torch.linalg.svdvals(iso_c_merge_tensor(taus))
    assert_close(s, expected.expand(3))


def test_iso_c_hand_case():
    # Σ τ = diag(1, 1) + diag(2, 0) = diag(3, 1): s̄ = 2, U Vᵀ = I → τm = diag(2, 2).
    pretrained = {"h.0.attn.c_proj.weight": diag(1.0, 1.0)}
    finetuned = {
        "cola": {"h.0.attn.c_proj.weight": diag(2.0, 2.0)},
        "mrpc": {"h.0.attn.c_proj.weight": diag(3.0, 1.0)},
    }
    merged = iso_c_merge(pretrained, finetuned, scaling_factor=1.0)
    assert_close(merged["h.0.attn.c_proj.weight"], diag(3.0, 3.0))


def test_iso_c_one_task_is_the_flattened_task_vector_not_the_finetuned_body():
    # τ1 = [[0, 3], [1, 0]] = P diag(1, 3), P = [[0, 1], [1, 0]]: s = (3, 1), s̄ = 2, U Vᵀ = P.
    # θ* = θ0 + α s̄ P = θ0 + [[0, 1], [1, 0]] with α = 0.5 (θ1 would be θ0 + [[0, 3], [1, 0]]).
    tau = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    pretrained = {"wpe.weight": torch.ones(2, 2)}
    finetuned = {"cola": {"wpe.weight": torch.ones(2, 2) + tau}}
    merged = iso_c_merge(pretrained, finetuned, scaling_factor=0.5)
    assert_close(merged["wpe.weight"], torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


def test_iso_c_one_d_keys_are_the_plain_mean():
    pretrained, finetuned = one_d_bodies()
    merged = iso_c_merge(pretrained, finetuned, scaling_factor=1.0)
    assert torch.equal(merged["h.0.ln_1.weight"], (A + B + C) / 3)  # Σ/n, not the running mean


def test_iso_c_transposing_every_matrix_transposes_the_output():
    pretrained, finetuned = random_pool_bodies()
    merged = iso_c_merge(pretrained, finetuned)
    merged_t = iso_c_merge(transposed(pretrained), {task: transposed(body) for task, body in finetuned.items()})
    assert_bodies_close(transposed(merged_t), merged)


def test_iso_c_conv1d_only_averages_the_embeddings():
    pretrained, finetuned = random_pool_bodies()
    merged = iso_c_merge(pretrained, finetuned, scaling_factor=2.0, svd_keys="conv1d")
    for key in ("wte.weight", "wpe.weight"):
        taus = [body[key] - pretrained[key] for body in finetuned.values()]
        assert torch.equal(merged[key], pretrained[key] + 2.0 * ((taus[0] + taus[1] + taus[2]) / 3))


def test_iso_c_warns_when_the_sum_is_rank_deficient():
    # wpe: Σ τ has one non-zero row (rank 1 < k = 4): three singular values 0 are lifted to s̄.
    pretrained, finetuned = random_pool_bodies(num_tasks=2)
    for body in finetuned.values():
        body["wpe.weight"] = pretrained["wpe.weight"].clone()
        body["wpe.weight"][2] += 1.0
    with pytest.warns(IllPosedMergeWarning, match=r"Iso-C: 'wpe\.weight'"):
        iso_c_merge(pretrained, finetuned)


# ---- Iso-CTS ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, fraction, expected",
    [
        (768, 7, 0.8, (614, 22)),  # GPT-2 small: int(614.4) = 614, (768 − 614)/7 = 22
        (64, 7, 0.8, (50, 2)),  # the tiny pool: c = 51, 13/7 → 2 per task, c = 64 − 14
        (14, 2, 0.65, (10, 2)),  # c = 9, (14 − 9)/2 = 2.5 rounds half to even → 2, c = 10
        (768, 7, 1.0, (768, 0)),  # f = 1: Iso-C
    ],
)
def test_iso_cts_sizes(k, n, fraction, expected):
    c, d = iso_cts_sizes(k, n, fraction)
    assert (c, d) == expected
    assert c + n * d == k


def test_iso_cts_sizes_refuse_a_negative_common_space():
    # k = 5, n = 3, f = 0.1: c = int(0.5) = 0, t = round(5/3)·3 = 6 > k, so c would be −1.
    with pytest.raises(ValueError, match="common_space_fraction 0.1 leaves a negative common subspace"):
        iso_cts_sizes(5, 3, 0.1)


def test_iso_cts_with_the_whole_common_space_is_iso_c():
    # f = 1: c = k, d = 0, Û = U and V̂ = V are orthonormal, s̄ = mean(s): Iso-C. (1-D keys: running
    # mean vs Σ/n, within 1 ulp.)
    pretrained, finetuned = random_pool_bodies()
    assert_bodies_close(
        iso_cts_merge(pretrained, finetuned, scaling_factor=0.7, common_space_fraction=1.0),
        iso_c_merge(pretrained, finetuned, scaling_factor=0.7),
    )


# The side-pinning case: k = 3, n = 2, f = 0.5 → c = 1, d = 1.
#   τ1 = 2 E00 + E11 + x E02,  τ2 = 2 E00 + E22 − x E02,  Σ = diag(4, 1, 1): Uc = e0, Vc = e0, sc = 4.
# Projecting the common *column* space (rows, the stored first index) out: w1 = E11, w2 = E22 whatever
# x is; Û = [e1 e2 e0], V̂ = [e1 e2 e0] are orthonormal, s̄ = (1 + 1 + 4)/3 = 2, τm = 2 I.
# Projecting the common *row* space (columns) out instead keeps x: with x = 2, w1 = E11 + 2 E02
# (top: σ = 2), w2 = E22 − 2 E02 (σ = √5), so s̄ = (4 + 2 + √5)/3 and ‖τm‖_F = s̄ √3 (P_U P_Vᵀ is
# orthogonal), not 2√3.
X = 2.0
SIDE_TAUS = [2 * E(0, 0) + E(1, 1) + X * E(0, 2), 2 * E(0, 0) + E(2, 2) - X * E(0, 2)]
SIDE_NORM_OTHER = (4 + 2 + math.sqrt(5)) / 3 * math.sqrt(3)


def test_iso_cts_projects_the_common_space_out_of_the_stored_rows():
    assert_close(iso_cts_merge_tensor(SIDE_TAUS, 0.5), 2 * torch.eye(3))
    other = iso_cts_merge_tensor([tau.T for tau in SIDE_TAUS], 0.5)
    assert math.isclose(torch.linalg.matrix_norm(other).item(), SIDE_NORM_OTHER, rel_tol=1e-5)


@pytest.mark.parametrize("key, is_conv1d", [("h.0.attn.c_attn.weight", True), ("wte.weight", False)])
def test_iso_cts_projection_side_fusionbench_vs_paper(key, is_conv1d):
    # A Conv1D weight is stored [in, out]: "fusionbench" projects the common *input* subspace out
    # (the stored rows), "paper" the common *output* subspace (it transposes to [out, in] and back).
    # wte has no [out, in] form: both modes merge it as stored.
    pretrained = {key: torch.zeros(3, 3)}
    finetuned = {task: {key: tau} for task, tau in zip(TASKS, SIDE_TAUS)}
    finetuned_t = {task: {key: tau.T.contiguous()} for task, tau in zip(TASKS, SIDE_TAUS)}
    args = dict(scaling_factor=1.0, common_space_fraction=0.5)
    fusionbench = iso_cts_merge(pretrained, finetuned, **args, projection_side="fusionbench")[key]
    assert_close(fusionbench, 2 * torch.eye(3))
    paper = iso_cts_merge(pretrained, finetuned, **args, projection_side="paper")[key]
    paper_t = iso_cts_merge(pretrained, finetuned_t, **args, projection_side="paper")[key]
    if is_conv1d:
        assert math.isclose(torch.linalg.matrix_norm(paper).item(), SIDE_NORM_OTHER, rel_tol=1e-5)
        assert_close(paper_t, 2 * torch.eye(3))  # the paper's side of Wᵀ is the stored side of W
    else:
        assert_close(paper, fusionbench, atol=0)


def test_iso_cts_one_d_keys_are_the_running_mean():
    pretrained, finetuned = one_d_bodies()
    merged = iso_cts_merge(pretrained, finetuned, scaling_factor=1.0)
    assert torch.equal(merged["h.0.ln_1.weight"], _running_mean_abc())


@NO_ILL_POSED
def test_iso_cts_flattens_the_spectrum():
    # The output is s̄ times a matrix with orthonormal columns: k equal singular values.
    pretrained, finetuned = random_pool_bodies()
    merged = iso_cts_merge(pretrained, finetuned, common_space_fraction=0.5)
    s = torch.linalg.svdvals(merged["h.0.mlp.c_proj.weight"] - pretrained["h.0.mlp.c_proj.weight"])
    assert_close(s, s.mean().expand(4))


def test_iso_cts_conv1d_only_averages_the_embeddings():
    pretrained, finetuned = random_pool_bodies()
    all_2d = iso_cts_merge(pretrained, finetuned, common_space_fraction=0.5)
    conv1d = iso_cts_merge(pretrained, finetuned, common_space_fraction=0.5, svd_keys="conv1d")
    for key in ("wte.weight", "wpe.weight"):
        taus = [body[key] - pretrained[key] for body in finetuned.values()]
        m = taus[0] + (taus[1] - taus[0]) / 2
        assert torch.equal(conv1d[key], pretrained[key] + (m + (taus[2] - m) / 3))
    for key in CONV1D:
        assert torch.equal(conv1d[key], all_2d[key])


def test_iso_cts_never_builds_the_rows_by_rows_projector(monkeypatch):
    # Uc (Ucᵀ w): every product has an inner or outer size ≤ k, never rows × rows (wte: 50257²).
    rows, cols = 40, 4
    generator = torch.Generator().manual_seed(5)
    taus = [torch.randn(rows, cols, generator=generator) for _ in range(2)]
    matmul = torch.Tensor.__matmul__

    def checked(a, b):
        out = matmul(a, b)
        assert out.numel() < rows * rows, f"a {tuple(out.shape)} product"
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", checked)
    iso_cts_merge_tensor(taus, 0.5)


# ---- CART -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling_factor", [0.5, 2.0, -1.0])
def test_cart_full_rank_is_the_simple_average_for_any_lambda(scaling_factor):
    # ρ = 1: lowrank(τ'i) = τ'i and Σ τ'i = Σ τi + n θ0 − n θ̄ = 0.
    pretrained, finetuned = random_pool_bodies()
    merged = cart_merge(pretrained, finetuned, scaling_factor=scaling_factor, rank_ratio=1.0)
    assert_bodies_close(merged, simple_average_merge(finetuned), atol=1e-6)


def test_cart_lambda_zero_is_the_simple_average():
    pretrained, finetuned = random_pool_bodies()
    merged = cart_merge(pretrained, finetuned, scaling_factor=0.0, rank_ratio=0.12)
    assert_bodies_close(merged, simple_average_merge(finetuned), atol=1e-6)


def test_cart_one_task_returns_the_finetuned_body():
    # θ̄ = θ0 + τ1 = θ1 and τ'1 = τ1 + θ0 − θ̄ = 0.
    pretrained, finetuned = random_pool_bodies(num_tasks=1)
    assert_bodies_close(cart_merge(pretrained, finetuned), finetuned["cola"], atol=1e-6)


def test_cart_keys_outside_the_rule_are_the_average_whatever_lambda():
    pretrained, finetuned = random_pool_bodies()
    merged = cart_merge(pretrained, finetuned, scaling_factor=5.0, rank_ratio=0.3)
    for key in SHAPES:
        if key in CONV1D:
            continue  # wte, wpe, LayerNorm, biases: the rule keeps τ'i in full, and Σ τ'i = 0
        taus = [body[key] - pretrained[key] for body in finetuned.values()]
        # ... up to λ times the rounding residue of Σ τ'i.
        assert_close(merged[key], pretrained[key] + (taus[0] + taus[1] + taus[2]) / 3, atol=1e-5)
    # The Conv1D weights do move away from the average.
    average = simple_average_merge(finetuned)
    assert all(not torch.allclose(merged[key], average[key], atol=1e-3) for key in CONV1D)


def test_cart_hand_case():
    # n = 3, k = 2, ρ = 0.5: r = 1. θ0 = 0, τ1 = diag(3, 0), τ2 = diag(0, 3), τ3 = diag(0, 6):
    # θ̄ = diag(1, 3); τ'1 = diag(2, −3), τ'2 = diag(−1, 0), τ'3 = diag(−1, 3).
    # Top triplet of each: diag(0, −3), diag(−1, 0), diag(0, 3); their sum is diag(−1, 0).
    # θ* = θ̄ + λ diag(−1, 0) = diag(1 − λ, 3); λ = 2: diag(−1, 3). (Simple average: diag(1, 3).)
    key = "h.0.mlp.c_proj.weight"
    pretrained = {key: torch.zeros(2, 2)}
    finetuned = {"cola": {key: diag(3.0, 0.0)}, "mrpc": {key: diag(0.0, 3.0)}, "rte": {key: diag(0.0, 6.0)}}
    assert cart_rank(2, 0.5) == 1
    assert_close(cart_merge(pretrained, finetuned, scaling_factor=2.0, rank_ratio=0.5)[key], diag(-1.0, 3.0))


def test_cart_transposing_every_matrix_transposes_the_output():
    pretrained, finetuned = random_pool_bodies()
    merged = cart_merge(pretrained, finetuned, rank_ratio=0.5)
    merged_t = cart_merge(
        transposed(pretrained), {task: transposed(body) for task, body in finetuned.items()}, rank_ratio=0.5
    )
    assert_bodies_close(transposed(merged_t), merged)


@pytest.mark.parametrize("k, ratio, rank", [(768, 0.12, 92), (768, 1.0, 768), (64, 0.12, 7), (4, 0.12, 1)])
def test_cart_rank(k, ratio, rank):
    assert cart_rank(k, ratio) == rank


# ---- the shared helpers --------------------------------------------------------------------------


def test_task_vectors_are_read_when_indexed_and_give_the_same_bits_as_a_list():
    # The per-key merges read each τi = θi − θ0 when they need it (twice for Iso-CTS and CART): the
    # results must be the bits of a plain list of task vectors.
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(6, 4, generator=generator)
    bodies = [base + 0.1 * torch.randn(6, 4, generator=generator) for _ in range(3)]
    lazy = TaskVectors(base, bodies)
    listed = [body - base for body in bodies]
    assert torch.equal(tsv_merge_tensor(lazy), tsv_merge_tensor(listed))
    assert torch.equal(iso_c_merge_tensor(lazy), iso_c_merge_tensor(listed))
    assert torch.equal(iso_cts_merge_tensor(lazy, 0.5), iso_cts_merge_tensor(listed, 0.5))
    for a, b in zip(cart_components(base, lazy, 0.5, True), cart_components(base, listed, 0.5, True)):
        assert torch.equal(a, b)
    weighted = TaskVectors(base, bodies, [2.0, 0.5, -1.0])
    assert torch.equal(weighted[2], -1.0 * (bodies[2] - base))
    assert torch.equal(lazy.transposed()[1], (bodies[1] - base).T)
    assert torch.equal(lazy.transposed().transposed()[1], bodies[1] - base)
    with pytest.raises(TypeError, match="one at a time"):
        lazy[0:2]


def test_ordered_sum_running_mean_and_low_rank():
    assert torch.equal(ordered_sum([A, B, C]), (A + B) + C)
    assert torch.equal(running_mean([A, B, C]), _running_mean_abc())
    # diag(3, 2, 1) keeps its top two singular triplets: diag(3, 2, 0).
    assert_close(low_rank(diag(3.0, 2.0, 1.0), 2), diag(3.0, 2.0, 0.0))


# ---- the MergeMethod classes on a real tiny pool ---------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> ModelPool:
    """Three fine-tuned GPT-2s, 1 layer, 8 wide (wte [50257, 8]), written as safetensors checkpoints."""
    paths = write_pool(tmp_path_factory.mktemp("svd_pool"), seed=3, tasks=TASKS, n_layer=1, n_embd=8, n_head=2)
    return ModelPool(**paths)


CLASS_CASES = [
    (TaskSingularVectorMerging, tsv_merge, {"alpha": 0.7}),
    (TaskSingularVectorMerging, tsv_merge, {"alpha": [0.5, 1.5, 1.0]}),
    (TaskSingularVectorMerging, tsv_merge, {"svd_keys": "conv1d", "exclude_keys": ["h.0.attn.c_proj.weight"]}),
    (IsoC, iso_c_merge, {"scaling_factor": 1.3}),
    (IsoC, iso_c_merge, {"svd_keys": "conv1d"}),
    (IsoCTS, iso_cts_merge, {"scaling_factor": 0.9, "common_space_fraction": 0.5}),
    (IsoCTS, iso_cts_merge, {"projection_side": "paper", "exclude_keys": ["wpe.weight"]}),
    (CART, cart_merge, {"scaling_factor": 1.5, "rank_ratio": 0.3}),
    (CART, cart_merge, {}),
]


@NO_ILL_POSED
@pytest.mark.parametrize("cls, whole_body, kwargs", CLASS_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CLASS_CASES)])
def test_the_key_by_key_merge_equals_the_whole_body_function(pool, cls, whole_body, kwargs):
    # The class streams the pool key by key from the checkpoints; the whole-body function gets
    # every body in memory: the same bits.
    merged = cls(pool, **kwargs).merge()
    expected = whole_body(pool.pretrained_body(), pool.finetuned_bodies(), **kwargs)
    assert list(merged) == list(pool.keys())
    assert_bodies_close(merged, expected, atol=0)
    assert all(torch.equal(merged[key].view(torch.int32), expected[key].view(torch.int32)) for key in merged)


REUSE_CASES = [
    (TaskSingularVectorMerging, tsv_module, "tsv_task_vector_tensor", "alpha", tsv_merge),
    (IsoC, iso_module, "iso_c_task_vector_tensor", "scaling_factor", iso_c_merge),
    (IsoCTS, iso_module, "iso_cts_task_vector_tensor", "scaling_factor", iso_cts_merge),
    (CART, cart_module, "cart_parts_tensor", "scaling_factor", cart_merge),
]


@NO_ILL_POSED
@pytest.mark.parametrize("cls, module, part, scale, whole_body", REUSE_CASES, ids=[c[0].__name__ for c in REUSE_CASES])
def test_a_sweep_computes_the_scale_free_part_once(pool, monkeypatch, cls, module, part, scale, whole_body):
    pool.keep_reused(True)
    try:
        first = cls(pool, **cls.recommended)
        first.merge()
        other = cls(pool, **{**cls.recommended, scale: 0.25})
        assert other.reusable_key() == first.reusable_key()
        monkeypatch.setattr(module, part, lambda *args, **kwargs: pytest.fail("the reused part was recomputed"))
        merged = other.merge()
    finally:
        pool.keep_reused(False)
    monkeypatch.undo()
    expected = whole_body(pool.pretrained_body(), pool.finetuned_bodies(), **{**cls.recommended, scale: 0.25})
    assert_bodies_close(merged, expected, atol=0)
    assert cls.display_name and cls.kind == "merged"


def test_tsv_alpha_list_is_not_reusable(pool):
    assert TaskSingularVectorMerging(pool, alpha=[1.0, 1.0, 1.0]).reusable_key() is None


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda pool: TaskSingularVectorMerging(pool, alpha=math.nan), "alpha"),
        (lambda pool: TaskSingularVectorMerging(pool, alpha=True), "alpha"),
        (lambda pool: TaskSingularVectorMerging(pool, alpha=[1.0, 2.0]), r"alpha.*one finite number per task \(3"),
        (lambda pool: TaskSingularVectorMerging(pool, alpha=[1.0, math.inf, 1.0]), r"alpha\[1\]"),
        (lambda pool: TaskSingularVectorMerging(pool, svd_keys="linear"), r"svd_keys.*'linear'"),
        (lambda pool: IsoC(pool, scaling_factor=math.inf), "scaling_factor"),
        (lambda pool: IsoC(pool, svd_keys="2d"), "svd_keys"),
        (lambda pool: IsoCTS(pool, common_space_fraction=0.0), r"common_space_fraction.*\(0, 1\].*got 0"),
        (lambda pool: IsoCTS(pool, common_space_fraction=1.5), "common_space_fraction"),
        (lambda pool: IsoCTS(pool, projection_side="output"), r"projection_side.*'output'"),
        (lambda pool: CART(pool, scaling_factor=math.nan), "scaling_factor"),
        (lambda pool: CART(pool, rank_ratio=0.0), r"rank_ratio.*\(0, 1\].*got 0"),
        (lambda pool: CART(pool, rank_ratio=1.2), "rank_ratio"),
    ],
)
def test_argument_validation(pool, make, match):
    with pytest.raises(MergelitError, match=match):
        make(pool)


@pytest.mark.parametrize("cls", [TaskSingularVectorMerging, IsoC, IsoCTS])
def test_an_unknown_excluded_key_is_refused_before_any_merging(pool, cls):
    method = cls(pool, exclude_keys=["wpe"])
    with pytest.raises(MergelitError, match=r"exclude_keys.*'wpe'"):
        method.merge()


def test_defaults_are_fusionbenchs_and_cart_uses_its_8_task_setting(pool):
    tsv, iso_c, iso_cts, cart = TaskSingularVectorMerging(pool), IsoC(pool), IsoCTS(pool), CART(pool)
    assert (tsv.alpha, tsv.exclude_keys, tsv.svd_keys) == (1.0, [], "all_2d")
    assert (iso_c.scaling_factor, iso_c.svd_keys) == (1.0, "all_2d")
    assert (iso_cts.scaling_factor, iso_cts.common_space_fraction, iso_cts.projection_side) == (1.0, 0.8, "fusionbench")
    assert (cart.scaling_factor, cart.rank_ratio) == (2.0, 0.12)


def test_merges_are_deterministic():
    pretrained, finetuned = random_pool_bodies()
    for merge in (tsv_merge, iso_c_merge, iso_cts_merge, cart_merge):
        assert_bodies_close(merge(pretrained, finetuned), merge(pretrained, finetuned), atol=0)
