"""PiToMe and ToMe token merging: pure functions on tensors, shared by eager, export and tests.

Every algorithm here answers one question, "which output slot does each token go to?", as a
`MergePlan`: the token each output slot keeps, the r tokens merged away and the slot each joins.
One size-weighted merge applies any plan: copy the kept tokens, add the few merged ones (a
small one-hot MatMul or scatter-add). All index values are data-dependent, all shapes are fixed
by the (frozen) merge count `r`, and every ranking breaks ties towards the lower index, in eager
PyTorch and in ONNX alike. `plan_slots` / `plan_from_slots` convert to and from the plain
assignment `dst [B, N]` of slot indices, the form decisions are compared and forced in.

Shapes: `x [B, N, C]`, `size [B, N, 1]`; `metric [B, T, d]` covers the T non-prefix tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ops.decision_tape import taped
from ops.reduction import Reduction

LOWERINGS = ("matmul", "scatter")
MERGE_IMPLS = ("decomposed", "fused")  # TokenMerge's modules, or the one `pitome::token_merge` operator
STEP_KINDS = ("pitome", "pitome_bsm", "tome", "pitome_text")

# Stand-ins for the similarity of pairs that involve padding (cosine lies in [-1, 1]).
_PAD_PAIR_SIM = 2.0
_PAD_REAL_SIM = -2.0
_PAD_ENERGY = 1.0e4


@dataclass(frozen=True)
class MergeStep:
    """What one layer merges: the algorithm, how many tokens `r`, and its energy margin."""

    kind: str
    r: int
    margin: float = 0.0
    lowering: str = "matmul"

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"unknown merge step kind {self.kind!r}")
        if self.lowering not in LOWERINGS:
            raise ValueError(f"unknown lowering {self.lowering!r}; choose one of {', '.join(LOWERINGS)}")


class MergePlan(NamedTuple):
    """One layer's merge decisions in the form the merge applies them.

    Output slot s starts from token `kept[b, s]` (`[B, n_out]`); token `merged[b, k]` (`[B, r]`)
    is added into slot `first_receiver + into[b, k]`. Slots before `first_receiver` (a layout
    fact, the same for every input) never receive a merged token, so `into` counts receivers
    only. Tokens in `dropped [B, d]` (pruning baselines) leave without a slot. Every token is
    kept, merged or dropped, once. Shapes are fixed by the counts, so the graph is static; the
    values are data.
    """

    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor
    first_receiver: int = 0
    dropped: torch.Tensor | None = None

    @property
    def n_out(self) -> int:
        return self.kept.shape[1]


DROPPED = -1  # the slot `plan_slots` gives a dropped token


def plan_slots(plan: MergePlan) -> torch.Tensor:
    """The plan as an assignment `dst [B, N]`: the output slot of every token (`DROPPED` for a
    dropped one)."""
    batch, n_out = plan.kept.shape
    slots = torch.arange(n_out, device=plan.kept.device).expand(batch, -1)
    n_dropped = 0 if plan.dropped is None else plan.dropped.shape[1]
    dst = torch.full((batch, n_out + plan.merged.shape[1] + n_dropped), DROPPED, dtype=torch.int64,
                     device=plan.kept.device)  # fmt: skip
    return dst.scatter(1, plan.kept, slots).scatter(1, plan.merged, plan.first_receiver + plan.into)


def plan_from_slots(dst: torch.Tensor, n_out: int, n_dropped: int = 0) -> MergePlan:
    """The plan of an assignment `dst [B, N]` whose slots `0..n_out-1` are all used and whose
    `n_dropped` other tokens are `DROPPED`.

    Each slot keeps its lowest-index token; the others are merged, in slot order. Sort keys are
    distinct, so any sort gives this order. Used to force decisions taken elsewhere.
    """
    tokens = dst.shape[1]
    positions = torch.arange(tokens, device=dst.device)
    by_slot = torch.sort(dst * tokens + positions, dim=-1).indices  # dropped tokens (slot -1) first
    dropped, by_slot = by_slot[:, :n_dropped], by_slot[:, n_dropped:]
    slot_sorted = dst.gather(1, by_slot)
    starts = torch.cat(
        [torch.ones_like(slot_sorted[:, :1], dtype=torch.bool), slot_sorted[:, 1:] != slot_sorted[:, :-1]], 1
    )
    # Group starts first (by slot), then the other tokens (by position): again distinct keys.
    rank = torch.arange(by_slot.shape[1], device=dst.device)
    members = by_slot.gather(1, torch.sort(torch.where(starts, slot_sorted, n_out + rank), dim=-1).indices)
    kept, merged = members[:, :n_out], members[:, n_out:]
    return MergePlan(kept, merged, dst.gather(1, merged), 0, dropped if n_dropped else None)


def _unit_rows(metric: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, as `F.normalize` computes them, minus its explicit
    broadcast (which exports as an Expand that materialises `[B, T, d]`)."""
    return metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-12)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Tokens of `scores [B, T]` from highest to lowest score, ties to the lower index.

    A stable sort, which export lowers to one ONNX TopK: the ONNX spec breaks TopK's ties by
    the lower index, the same order (`exporter.op_lowering`).
    """
    return taped("order", scores, torch.sort(scores, dim=-1, descending=True, stable=True).indices)


def best_match(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `scores [B, R, C]`, the best score and its column `[B, R]`, ties to the lower
    column (ONNX ArgMax keeps the first maximum too). With a forced choice (`ops.decision_tape`)
    the score is the one at the forced column."""
    best_score, best = scores.max(dim=-1)
    chosen = taped("match", scores, best)
    if chosen is not best:
        best_score = scores.gather(-1, chosen[..., None]).squeeze(-1)
    return best_score, chosen


@torch.library.custom_op("pitome::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of `x [B, T, C]` picked per batch by `index [B, K]` -> `[B, K, C]`.

    An operator of its own so that export emits one ONNX GatherND (batch_dims 1) for it; the
    equivalent `gather` exports as GatherElements on an index expanded to `[B, K, C]`, a
    materialised int64 tensor, several times slower on ONNX Runtime.
    """
    return _take_rows(x, index)


@gather_rows.register_fake
def _gather_rows_shape(x, index):
    return x.new_empty(x.shape[0], index.shape[1], x.shape[2])


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _gather_rows(x: torch.Tensor, *indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of `x` at each index: the `gather_rows` operator when traced for export or
    compilation, its body called directly in eager mode, where a custom operator's dispatch
    costs more than the gather itself (about 10 us a call on CPU, and more per layer on a GPU,
    where the merge is launch-bound)."""
    traced = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
    take = gather_rows if traced else _take_rows
    return tuple(take(x, index) for index in indices)


def _bipartite_plan(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, r: int) -> MergePlan:
    """Bipartite soft matching: the r A tokens with the best B match merge into it.

    `a [B, nA]` and `b [B, nB]` are token indices, `scores [B, nA, nB]` their similarity.
    Output `[unmerged A (in A order), B]`; only B slots receive.
    """
    best_score, best_b = best_match(scores)
    a_order = descending_order(best_score)
    merged_a = a_order[:, :r]
    n_stay = a.shape[1] - r
    kept = b
    if n_stay > 0:  # the unmerged A tokens, back in A order (distinct values: any sort will do)
        # Sorted as float32 (exact below 2**24): TensorRT's TopK takes floating-point input only.
        stay_a = torch.sort(a_order[:, r:].to(torch.float32), dim=-1, stable=True).values.to(torch.int64)
        kept = torch.cat([a.gather(1, stay_a), b], dim=1)
    return MergePlan(kept, a.gather(1, merged_a), best_b.gather(1, merged_a), n_stay)


def _alternating_plan(
    metric: torch.Tensor, r: int, b_first: bool = False, valid: torch.Tensor | None = None
) -> MergePlan:
    """Bipartite soft matching with A/B alternating along the token axis of `metric [B, T, d]`.

    A = tokens 0,2,4,.. and B = 1,3,5,.. (swapped when `b_first`). With `valid [B, T]`, pairs
    involving padding are made padding-safe.
    """
    a_par = int(b_first)
    b_par = 1 - a_par
    scores = metric[:, a_par::2] @ metric[:, b_par::2].transpose(1, 2)
    if valid is not None:
        scores = padding_safe_similarity(scores, valid[:, a_par::2], valid[:, b_par::2])
    tokens = torch.arange(metric.shape[1], device=metric.device).expand(scores.shape[0], -1)
    return _bipartite_plan(tokens[:, a_par::2], tokens[:, b_par::2], scores, r)


def _protected_plan(order: torch.Tensor, a: torch.Tensor, b: torch.Tensor, best_b: torch.Tensor) -> MergePlan:
    """`[protected, B]` layout: every A token (`a [B, r]`) merges into B token `b[best_b]`.

    `order` ranks all T tokens; those past the first 2r are protected and keep their slot.
    """
    r = a.shape[1]
    n_protected = order.shape[1] - 2 * r
    return MergePlan(torch.cat([order[:, 2 * r :], b], dim=1), a, best_b, n_protected)


def padding_safe_similarity(sim: torch.Tensor, valid_rows: torch.Tensor, valid_cols: torch.Tensor) -> torch.Tensor:
    """Replace similarities that involve padding by constants: pad-pad above any cosine, pad-real below.

    Padding then matches padding first and never a real token, whatever the padding holds.
    """
    real_pair = valid_rows[:, :, None] * valid_cols[:, None, :]
    pad_pair = (1.0 - valid_rows)[:, :, None] * (1.0 - valid_cols)[:, None, :]
    return torch.where(real_pair > 0, sim, torch.where(pad_pair > 0, _PAD_PAIR_SIM, _PAD_REAL_SIM))


def pitome_energy(sim: torch.Tensor, margin: float) -> torch.Tensor:
    """Vision energy `[B, T]`: mean over j of ELU(sim_ij - margin), alpha 1 (high = redundant)."""
    return F.elu(sim - margin).mean(dim=-1)


def gaussian_energy(sim: torch.Tensor, margin: float, valid: torch.Tensor) -> torch.Tensor:
    """Text energy `[B, T]`: Gaussian kernel of (1 - sim) with sigma = 1 - margin, mean over valid j."""
    sigma = 1.0 - margin
    kernel = torch.exp(-0.5 * ((1.0 - sim) / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))
    return (kernel * valid[:, None, :]).sum(-1) / valid.sum(-1, keepdim=True).clamp_min(1.0)


def pitome_assignment(metric: torch.Tensor, r: int, margin: float, bsm: bool) -> MergePlan:
    """PiToMe (vision) plan: tokens ranked by energy (high = redundant).

    `bsm=False`: the top 2r energies are mergeable (A/B alternate by rank, every A merges into
    its best B), the rest are protected; output `[protected, B]`. `bsm=True`: A/B alternate
    over all T by energy rank and the r best-matched A tokens merge; output `[unmerged A, B]`.
    """
    metric = _unit_rows(metric)
    order = descending_order(pitome_energy(metric @ metric.transpose(1, 2), margin))
    if bsm:
        a, b = order[:, 0::2], order[:, 1::2]
        metric_a, metric_b = _gather_rows(metric, a, b)
        return _bipartite_plan(a, b, metric_a @ metric_b.transpose(1, 2), r)
    a, b = order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2]
    metric_a, metric_b = _gather_rows(metric, a, b)
    _, best_b = best_match(metric_a @ metric_b.transpose(1, 2))
    return _protected_plan(order, a, b, best_b)


def pitome_text_assignment(metric: torch.Tensor, r: int, margin: float, valid: torch.Tensor) -> MergePlan:
    """PiToMe (text) plan: A = top r energies, B = next r, the rest protected.

    `valid [B, T]` (1 real, 0 padding): padding ranks first, matches only padding, and takes no
    part in real tokens' energies, so padding content cannot change a real token's slot.
    """
    metric = _unit_rows(metric)
    sim = padding_safe_similarity(metric @ metric.transpose(1, 2), valid, valid)
    order = descending_order(torch.where(valid > 0, gaussian_energy(sim, margin, valid), _PAD_ENERGY))
    a, b = order[:, :r], order[:, r : 2 * r]
    (sim_a,) = _gather_rows(sim, a)
    _, best_b = best_match(sim_a.gather(2, b[:, None, :].expand(-1, r, -1)))
    return _protected_plan(order, a, b, best_b)


def tome_assignment(
    metric: torch.Tensor, r: int, position_offset: int = 1, valid: torch.Tensor | None = None
) -> MergePlan:
    """ToMe bipartite soft matching by position: A/B alternate over the full sequence.

    `position_offset` is the number of prefix tokens before `metric`'s tokens, so A and B keep
    ToMe's parity of positions in the full sequence (prefix tokens sit in A, never merged).
    Output layout `[unmerged A (in position order), B]`. `valid [B, T]` makes it padding-safe.
    """
    return _alternating_plan(_unit_rows(metric), r, position_offset % 2 == 1, valid)


def size_weighted_merge(
    x: torch.Tensor, size: torch.Tensor, plan: MergePlan, lowering: str = "matmul"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `x [B, N, C]` by `plan` into the size-weighted mean of each slot's tokens.

    Returns `(x_out [B, n_out, C], size_out [B, n_out, 1])`. Slots that cannot receive are
    plain copies. A receiving slot starts from its kept token and each merged token pulls it
    towards itself by its share of the slot's size, `x_d + sum_k s_k / S_d (x_k - x_d)`: the
    size-weighted mean, in which a token alone in its slot adds exactly 0 and is copied
    bit-exactly, and a slot whose sizes are all 0 (padding) keeps its own token. `lowering`
    adds the r pulls as a `[receivers, r]` one-hot MatMul (deterministic and plugin-free on
    TensorRT) or as scatter-add; both give the same numbers. Beside the copy the work is
    O(receivers r C), not the O(n_out N C) of a dense one-hot product.
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    kept, merged, into, first = plan.kept, plan.merged, plan.into, plan.first_receiver
    x_tail, x_merged = _gather_rows(x, kept[:, first:], merged)
    size_tail, size_merged = _gather_rows(size, kept[:, first:], merged)
    if lowering == "matmul":
        receivers = torch.arange(kept.shape[1] - first, device=x.device)
        joins = (receivers[None, :, None] == into[:, None, :]).to(x.dtype)  # [B, receivers, r]
        size_out = size_tail + joins @ size_merged
    else:
        size_out = size_tail.scatter_add(1, into[..., None], size_merged)
    (size_dest,), (x_dest,) = _gather_rows(size_out, into), _gather_rows(x_tail, into)
    # The smallest normal number of the dtype: 1e-12 is 0 in float16, and a padding-only slot
    # (sizes 0) would give 0/0 and spread NaN through the one-hot MatMul.
    share = size_merged / size_dest.clamp_min(torch.finfo(size_dest.dtype).tiny)
    pull = (x_merged - x_dest) * share
    if lowering == "matmul":
        x_out = x_tail + joins @ pull
    else:
        x_out = x_tail.scatter_add(1, into[..., None].expand_as(pull), pull)
    if first == 0:
        return x_out, size_out
    (x_head,) = _gather_rows(x, kept[:, :first])
    (size_head,) = _gather_rows(size, kept[:, :first])
    return torch.cat([x_head, x_out], dim=1), torch.cat([size_head, size_out], dim=1)


def joins(plan: MergePlan, dtype: torch.dtype) -> torch.Tensor:
    """`[B, receivers, r]` one-hot: merged token k joins receiving slot j (slots from
    `first_receiver` on). Deterministic and plugin-free in export (a MatMul, no scatter)."""
    receivers = torch.arange(plan.kept.shape[1] - plan.first_receiver, device=plan.kept.device)
    return (receivers[None, :, None] == plan.into[:, None, :]).to(dtype)


def slot_sums(values: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Per output slot, the sum of `values [B, N, K]` over the tokens it holds -> `[B, n_out, K]`
    (dropped tokens count nowhere)."""
    first = plan.first_receiver
    kept, merged = _gather_rows(values, plan.kept, plan.merged)
    tail = kept[:, first:] + joins(plan, values.dtype) @ merged
    return torch.cat([kept[:, :first], tail], dim=1) if first else tail


def merge_assignment(
    metric: torch.Tensor, step: MergeStep, num_prefix: int, valid: torch.Tensor | None = None
) -> MergePlan:
    """The plan for all N tokens: prefix tokens keep the first slots, untouched.

    `metric [B, N, d]` covers all N tokens; `valid [B, N]` (text: 1 real, 0 padding) is required
    by `pitome_text` and makes `tome` padding-safe. Decisions are computed in FP32 whatever the
    model's dtype: half-precision similarities tie and round where FP32 ones do not.
    """
    if metric.dtype != torch.float32:  # static at trace time: an FP32 export gains no Cast
        metric = metric.float()
        valid = None if valid is None else valid.float()
    patch_metric = metric[:, num_prefix:]
    patch_valid = None if valid is None else valid[:, num_prefix:]
    if step.kind == "tome":
        plan = tome_assignment(patch_metric, step.r, num_prefix, patch_valid)
    elif step.kind == "pitome_text":
        plan = pitome_text_assignment(patch_metric, step.r, step.margin, patch_valid)
    else:
        plan = pitome_assignment(patch_metric, step.r, step.margin, bsm=step.kind == "pitome_bsm")
    if num_prefix == 0:
        return plan
    prefix = torch.arange(num_prefix, device=metric.device).expand(metric.shape[0], -1)
    kept = torch.cat([prefix, plan.kept + num_prefix], 1)
    return MergePlan(kept, plan.merged + num_prefix, plan.into, plan.first_receiver + num_prefix)


class PlanAssign(torch.nn.Module):
    """A module whose forward returns a layer's `MergePlan`: the decisions that parity captures
    and forces (`exporter.decisions`), whatever the algorithm."""


class MergeAssign(PlanAssign):
    """The decision half of a merge: similarity, energy, ranking and matching -> a `MergePlan`."""

    def __init__(self, step: MergeStep, num_prefix: int) -> None:
        super().__init__()
        self.step, self.num_prefix = step, num_prefix

    def forward(self, metric: torch.Tensor, valid: torch.Tensor | None) -> MergePlan:
        return merge_assignment(metric, self.step, self.num_prefix, valid)


class MergeCombine(torch.nn.Module):
    """The arithmetic half of a merge: the size-weighted mean of each slot's tokens."""

    def __init__(self, lowering: str) -> None:
        super().__init__()
        self.lowering = lowering

    def forward(self, x: torch.Tensor, size: torch.Tensor, plan: MergePlan):
        return size_weighted_merge(x, size, plan, self.lowering)


@torch.library.custom_op("pitome::token_merge", mutates_args=())
def token_merge_op(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    valid: torch.Tensor | None,
    kind: str,
    r: int,
    margin: float,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole merge step as one operator (`torch.ops.pitome.token_merge`).

    Export maps it to a single `pitome::TokenMerge` node that a TensorRT plugin implements;
    in PyTorch it runs the same `merge_assignment` and `size_weighted_merge` as `TokenMerge`
    on the CPU, and the fused Triton kernel (`ops.kernels`) on CUDA.
    """
    return size_weighted_merge(x, size, merge_assignment(metric, MergeStep(kind, r, margin), num_prefix, valid))


@token_merge_op.register_kernel("cuda")
def _token_merge_cuda(x, size, metric, valid, kind, r, margin, num_prefix):
    """On CUDA the operator is the fused Triton kernel of `ops.kernels` (one launch per step,
    same decisions); imported here, on first use, so that CPU-only use never imports triton."""
    from ops.kernels import token_merge

    return token_merge(x, size, metric, valid, MergeStep(kind, r, margin), num_prefix)


@token_merge_op.register_fake
def _token_merge_shapes(x, size, metric, valid, kind, r, margin, num_prefix):
    n_out = x.shape[1] - r
    return x.new_empty(x.shape[0], n_out, x.shape[2]), size.new_empty(size.shape[0], n_out, 1)


class TokenMerge(Reduction):
    """One layer's PiToMe or ToMe merge as modules, so that an exported graph names its parts by scope.

    `assign` holds every decision (similarity, energy, ranking, matching) and `combine` the
    size-weighted mean; export prefixes their nodes with `<module path>.assign/` and
    `.combine/`, which is how reduced-precision passes find the nodes to keep in FP32.
    With `fused` set, the step runs as the single `pitome::token_merge` operator instead
    (same numbers), which export emits as one plugin node and CUDA runs as one Triton kernel.
    """

    def __init__(self, step: MergeStep, num_prefix: int) -> None:
        super().__init__(step.r, num_prefix)
        self.step = step
        self.fused = False
        self.assign = MergeAssign(step, num_prefix)
        self.combine = MergeCombine(step.lowering)

    def reduce(self, x, size, metric, valid=None, attention=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [B, N, C]`, `size [B, N, 1]` -> N - r tokens; prefix tokens stay first, untouched."""
        if self.fused:
            step = self.step
            return token_merge_op(x, size, metric, valid, step.kind, step.r, step.margin, self.assign.num_prefix)
        return self.combine(x, size, self.assign(metric, valid))
