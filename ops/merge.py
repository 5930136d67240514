"""PiToMe and ToMe token merging: pure functions on tensors, shared by eager, export and tests.

Every algorithm here answers one question, "which output slot does each token go to?", as an
assignment `dst [B, T]` of int64 slot indices. One size-weighted merge then applies any
assignment, lowered either as scatter-add or as a one-hot matrix and a MatMul. All index
values are data-dependent, all shapes are fixed by the (frozen) merge count `r`, and every
ranking breaks ties towards the lower index, in eager PyTorch and in ONNX alike.

Shapes: `x [B, N, C]`, `size [B, N, 1]`; `metric [B, T, d]` covers the T non-prefix tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOWERINGS = ("matmul", "scatter")
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


def descending_rank(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of `scores [B, T]` from highest to lowest, ties to the lower index.

    Returns `(order, rank)`: `order[b, k]` is the token at rank k and `rank[b, i]` the rank of
    token i. Ranks come from pairwise comparisons, so no sort stability is needed and the
    exported graph (Less/Equal, ReduceSum, TopK over distinct ranks) gives the same order.
    """
    t = scores.shape[-1]
    ahead = scores[..., None, :] > scores[..., :, None]  # [B, i, j]: token j ranks before i
    tied = scores[..., None, :] == scores[..., :, None]
    lower = torch.ones(t, t, dtype=torch.bool, device=scores.device).tril(-1)  # j < i
    rank = (ahead | (tied & lower)).to(torch.float32).sum(-1)
    order = torch.topk(rank, t, dim=-1, largest=False, sorted=True).indices
    return order, rank.to(torch.int64)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x [B, T, C]` rows picked by `index [B, K]` -> `[B, K, C]`."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """`[e0, o0, e1, o1, ...]` from `[B, ceil(n/2)]` and `[B, floor(n/2)]`."""
    n = even.shape[1] + odd.shape[1]
    if odd.shape[1] < even.shape[1]:
        odd = torch.cat([odd, odd[:, :1]], dim=1)
    return torch.stack([even, odd], dim=-1).reshape(even.shape[0], -1)[:, :n]


def _bipartite_slots(scores: torch.Tensor, r: int, first_slot: int) -> tuple[torch.Tensor, int]:
    """Slots of the A tokens given A->B similarity `scores [B, nA, nB]`.

    The r A tokens with the best match merge into it; the others stay, in A order. Output
    layout from `first_slot`: unmerged A, then B. Returns (slots of A `[B, nA]`, n unmerged).
    """
    n_a = scores.shape[1]
    best_score, best_b = scores.max(dim=-1)
    n_unmerged = n_a - r
    b_start = first_slot + n_unmerged
    if n_unmerged == 0:
        return b_start + best_b, 0
    _, a_rank = descending_rank(best_score)
    merged = a_rank < r
    stay_slot = first_slot + torch.cumsum((~merged).to(torch.int64), dim=1) - 1
    return torch.where(merged, b_start + best_b, stay_slot), n_unmerged


def _alternating_assignment(
    metric: torch.Tensor, r: int, b_first: bool = False, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Bipartite soft matching with A/B alternating along the token axis of `metric`.

    A = tokens 0,2,4,.. and B = 1,3,5,.. (swapped when `b_first`). With `valid [B, T]`, pairs
    involving padding are made padding-safe. Returns slots `[B, T]` for `[unmerged A, B]`.
    """
    first, second = metric[:, 0::2], metric[:, 1::2]
    a, b = (second, first) if b_first else (first, second)
    scores = a @ b.transpose(1, 2)
    if valid is not None:
        valid_first, valid_second = valid[:, 0::2], valid[:, 1::2]
        valid_a, valid_b = (valid_second, valid_first) if b_first else (valid_first, valid_second)
        scores = padding_safe_similarity(scores, valid_a, valid_b)
    a_slots, n_unmerged = _bipartite_slots(scores, r, 0)
    b_slots = n_unmerged + torch.arange(b.shape[1], device=metric.device).expand(metric.shape[0], -1)
    return _interleave(b_slots, a_slots) if b_first else _interleave(a_slots, b_slots)


def _protected_assignment(
    sim_ab: torch.Tensor, n_protected: int, r: int, batch: int, device: torch.device, pair: str
) -> torch.Tensor:
    """Slots in rank order for `[A, B, protected]`-shaped splits: every A merges into its best B.

    Output layout: `[protected, B]`. `pair` says how A and B sit in rank order: "alternate"
    (A = 0,2,..; B = 1,3,.. within the top 2r) or "blocks" (A = top r, B = the next r).
    """
    a_slots, _ = _bipartite_slots(sim_ab, r, n_protected)
    b_slots = n_protected + torch.arange(r, device=device).expand(batch, -1)
    protected_slots = torch.arange(n_protected, device=device).expand(batch, -1)
    head = _interleave(a_slots, b_slots) if pair == "alternate" else torch.cat([a_slots, b_slots], dim=1)
    return torch.cat([head, protected_slots], dim=1)


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


def pitome_assignment(metric: torch.Tensor, r: int, margin: float, bsm: bool) -> tuple[torch.Tensor, int]:
    """PiToMe (vision) assignment `[B, T]` and the number of output tokens.

    `bsm=False`: the top 2r energies are mergeable (A/B alternate by rank, every A merges),
    the rest are protected; output `[protected, B]`. `bsm=True`: A/B alternate over all T
    by energy rank and the r best-matched A tokens merge; output `[unmerged A, B]`.
    """
    metric = F.normalize(metric, dim=-1)
    sim = metric @ metric.transpose(1, 2)
    order, rank = descending_rank(pitome_energy(sim, margin))
    t = metric.shape[1]
    if bsm:
        dst_in_order = _alternating_assignment(_gather_tokens(metric, order), r)
    else:
        ranked = _gather_tokens(metric, order[:, : 2 * r])
        a, b = ranked[:, 0::2], ranked[:, 1::2]
        sim_ab = a @ b.transpose(1, 2)
        dst_in_order = _protected_assignment(sim_ab, t - 2 * r, r, metric.shape[0], metric.device, "alternate")
    return dst_in_order.gather(1, rank), t - r


def pitome_text_assignment(
    metric: torch.Tensor, r: int, margin: float, valid: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """PiToMe (text) assignment: A = top r energies, B = next r, the rest protected.

    `valid [B, T]` (1 real, 0 padding): padding ranks first, matches only padding, and takes no
    part in real tokens' energies, so padding content cannot change a real token's slot.
    """
    metric = F.normalize(metric, dim=-1)
    sim = metric @ metric.transpose(1, 2)
    sim = padding_safe_similarity(sim, valid, valid)
    energy = torch.where(valid > 0, gaussian_energy(sim, margin, valid), _PAD_ENERGY)
    order, rank = descending_rank(energy)
    ranked = _gather_tokens(sim, order[:, : 2 * r])  # rows: A then B, in rank order
    sim_ab = ranked[:, :r].gather(2, order[:, None, r : 2 * r].expand(-1, r, -1))
    t = metric.shape[1]
    dst_in_order = _protected_assignment(sim_ab, t - 2 * r, r, metric.shape[0], metric.device, "blocks")
    return dst_in_order.gather(1, rank), t - r


def tome_assignment(
    metric: torch.Tensor, r: int, position_offset: int = 1, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """ToMe bipartite soft matching by position: A/B alternate over the full sequence.

    `position_offset` is the number of prefix tokens before `metric`'s tokens, so A and B keep
    ToMe's parity of positions in the full sequence (prefix tokens sit in A, never merged).
    Output layout `[unmerged A (in position order), B]`. `valid [B, T]` makes it padding-safe.
    """
    dst = _alternating_assignment(F.normalize(metric, dim=-1), r, position_offset % 2 == 1, valid)
    return dst, metric.shape[1] - r


def size_weighted_merge(
    x: torch.Tensor, size: torch.Tensor, dst: torch.Tensor, n_out: int, lowering: str = "matmul"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `x [B, N, C]` into `n_out` slots by the size-weighted mean of each slot's group.

    Returns `(x_out [B, n_out, C], size_out [B, n_out, 1])`. Each token is weighted by
    `size / group_size` before summing, so a token alone in its slot is copied bit-exactly.
    A group whose sizes are all 0 (padding) gives 0. `lowering` picks scatter-add or a one-hot
    matrix + MatMul (deterministic and plugin-free on TensorRT); both give the same numbers.
    """
    if lowering == "matmul":
        slots = torch.arange(n_out, device=x.device)
        assign_t = (slots[None, :, None] == dst[:, None, :]).to(x.dtype)  # [B, n_out, N]
        size_out = assign_t @ size
        weights = size / size_out.gather(1, dst[..., None]).clamp_min(1e-12)
        return assign_t @ (x * weights), size_out
    if lowering == "scatter":
        index = dst[..., None]
        size_out = size.new_zeros(size.shape[0], n_out, 1).scatter_add(1, index, size)
        weights = size / size_out.gather(1, index).clamp_min(1e-12)
        merged = x.new_zeros(x.shape[0], n_out, x.shape[2])
        return merged.scatter_add(1, index.expand(-1, -1, x.shape[2]), x * weights), size_out
    raise ValueError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")


def merge_assignment(
    metric: torch.Tensor, step: MergeStep, num_prefix: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Slots `[B, N]` for all N tokens (prefix tokens keep theirs, first) and the output count.

    `metric [B, N, d]` covers all N tokens; `valid [B, N]` (text: 1 real, 0 padding) is required
    by `pitome_text` and makes `tome` padding-safe.
    """
    patch_metric = metric[:, num_prefix:]
    patch_valid = None if valid is None else valid[:, num_prefix:]
    if step.kind == "tome":
        dst, n_out = tome_assignment(patch_metric, step.r, num_prefix, patch_valid)
    elif step.kind == "pitome_text":
        dst, n_out = pitome_text_assignment(patch_metric, step.r, step.margin, patch_valid)
    else:
        dst, n_out = pitome_assignment(patch_metric, step.r, step.margin, bsm=step.kind == "pitome_bsm")
    prefix = torch.arange(num_prefix, device=metric.device).expand(metric.shape[0], -1)
    return torch.cat([prefix, dst + num_prefix], dim=1), n_out + num_prefix


class MergeAssign(torch.nn.Module):
    """The decision half of a merge: similarity, energy, ranking and matching -> slots."""

    def __init__(self, step: MergeStep, num_prefix: int) -> None:
        super().__init__()
        self.step, self.num_prefix = step, num_prefix

    def forward(self, metric: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        return merge_assignment(metric, self.step, self.num_prefix, valid)


class MergeCombine(torch.nn.Module):
    """The arithmetic half of a merge: the size-weighted mean of each slot's tokens."""

    def __init__(self, lowering: str) -> None:
        super().__init__()
        self.lowering = lowering

    def forward(self, x: torch.Tensor, size: torch.Tensor, dst: torch.Tensor, n_out: int):
        return size_weighted_merge(x, size, dst, n_out, self.lowering)


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
    in PyTorch it runs the same `merge_assignment` and `size_weighted_merge` as `TokenMerge`.
    """
    dst, n_out = merge_assignment(metric, MergeStep(kind, r, margin), num_prefix, valid)
    return size_weighted_merge(x, size, dst, n_out)


@token_merge_op.register_fake
def _token_merge_shapes(x, size, metric, valid, kind, r, margin, num_prefix):
    n_out = x.shape[1] - r
    return x.new_empty(x.shape[0], n_out, x.shape[2]), size.new_empty(size.shape[0], n_out, 1)


class TokenMerge(torch.nn.Module):
    """One layer's merge as modules, so that an exported graph names its parts by scope.

    `assign` holds every decision (similarity, energy, ranking, matching) and `combine` the
    size-weighted mean; export prefixes their nodes with `<module path>.assign/` and
    `.combine/`, which is how reduced-precision passes find the nodes to keep in FP32.
    With `fused` set, the step runs as the single `pitome::token_merge` operator instead
    (same numbers), which export emits as one plugin node.
    """

    def __init__(self, step: MergeStep, num_prefix: int) -> None:
        super().__init__()
        self.step = step
        self.fused = False
        self.assign = MergeAssign(step, num_prefix)
        self.combine = MergeCombine(step.lowering)

    def forward(
        self, x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [B, N, C]`, `size [B, N, 1]` -> N - r tokens; prefix tokens stay first, untouched."""
        if self.step.r == 0:
            return x, size
        if self.fused:
            step = self.step
            return token_merge_op(x, size, metric, valid, step.kind, step.r, step.margin, self.assign.num_prefix)
        dst, n_out = self.assign(metric, valid)
        return self.combine(x, size, dst, n_out)
