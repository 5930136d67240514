"""One whole merge step in Triton: one kernel, one program per batch element (+ a parallel energy kernel).

`token_merge_kernel` computes what `ops.merge.merge_assignment` + `size_weighted_merge` compute,
for every step kind: unit rows, similarity, energy, the stable descending ranking (packed keys,
ties to the lower index), matching and the size-weighted combine. Decisions are FP32 whatever
the input dtype. Everything stays in registers (no scratch buffer), which is what lets the same
kernel serve as TensorRT's ahead-of-time plugin, where a plugin launches one kernel and gets no
workspace. Vectors over tokens are padded to powers of two and masked.

`energy_kernel` optionally takes the O(T^2 d) energies off it, over (batch, row block) programs,
so that small batches use more than one SM per layer; `token_merge_kernel` then reads them.

Parameters: pointers only (x, size, metric, valid, x_out, size_out, slots, energy), everything
else is a compile-time constant of the layer (shapes, r, kind, margin), so the kernel's PTX
parameter list is the plugin's inputs then outputs. `valid`, `slots` and `energy` may be None
(specialised away).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ops import merge as reference

# Kind codes (constexpr KIND); `ops.kernels.launch.KIND_CODES` maps `MergeStep.kind` to them.
PITOME = tl.constexpr(0)
PITOME_BSM = tl.constexpr(1)
TOME = tl.constexpr(2)
PITOME_TEXT = tl.constexpr(3)
_PAD_PAIR_SIM = tl.constexpr(reference._PAD_PAIR_SIM)  # ops.merge's padding stand-ins, as constexprs
_PAD_REAL_SIM = tl.constexpr(reference._PAD_REAL_SIM)
_PAD_ENERGY = tl.constexpr(reference._PAD_ENERGY)
_LAST_KEY = tl.constexpr(-(1 << 62))  # below every packed key: masked lanes sort last (descending)
_INDEX_BITS = tl.constexpr(16)  # tokens per sequence < 2**16
_INDEX_MASK = tl.constexpr((1 << 16) - 1)
_AFTER_ALL = tl.constexpr(1 << 30)  # above every int32 sort value: masked lanes sort last (ascending)


@triton.jit
def _unit_rows(metric_ptr, tokens, mask, D: tl.constexpr, DP: tl.constexpr):
    """FP32 rows `tokens` of one batch element's metric `[*, D]`, scaled to unit L2 norm -> `[M, DP]`."""
    cols = tl.arange(0, DP)
    rows = tl.load(
        metric_ptr + tokens[:, None] * D + cols[None, :], mask=mask[:, None] & (cols[None, :] < D), other=0.0
    ).to(tl.float32)
    norm = tl.sqrt_rn(tl.sum(rows * rows, axis=1))  # IEEE-rounded, as PyTorch's, not the fast approximations
    return tl.div_rn(rows, tl.maximum(norm, 1e-12)[:, None])


@triton.jit
def _valid_of(valid_ptr, tokens, mask, HAS_VALID: tl.constexpr):
    """FP32 validity (1 real, 0 padding) of `tokens`; all ones without a mask, 0 on masked lanes."""
    if HAS_VALID:
        return tl.load(valid_ptr + tokens, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, 1.0, 0.0)


@triton.jit
def _similarity(u_rows, u_cols, v_rows, v_cols, PADDING_SAFE: tl.constexpr, BROADCAST_DOT: tl.constexpr):
    """Cosine similarity `[M, M']` of unit rows, in IEEE FP32 (no TF32); padding pairs as in
    `ops.merge.padding_safe_similarity` when `PADDING_SAFE`.

    `BROADCAST_DOT` (the interpreter) sums products instead of calling `tl.dot`, which the
    interpreter hands to numpy's BLAS, whose rounding of a row depends on its position: equal
    rows would then lose their exact ties. On a GPU, Triton's IEEE FP32 dot computes every output
    element with the same FMA chain (not checked on a GPU here: the device check compares)."""
    if BROADCAST_DOT:
        sim = tl.sum(u_rows[:, None, :] * u_cols[None, :, :], axis=2)
    else:
        sim = tl.dot(u_rows, tl.trans(u_cols), input_precision="ieee")
    if PADDING_SAFE:
        real = (v_rows[:, None] * v_cols[None, :]) > 0
        pad = ((1.0 - v_rows)[:, None] * (1.0 - v_cols)[None, :]) > 0
        sim = tl.where(real, sim, tl.where(pad, _PAD_PAIR_SIM, _PAD_REAL_SIM))
    return sim


@triton.jit
def _energy_rows(
    metric_ptr, valid_ptr, rows, T: tl.constexpr, P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    KIND: tl.constexpr, MARGIN: tl.constexpr, SIGMA: tl.constexpr, GAUSS_NORM: tl.constexpr,
    HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, BROADCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Energy of patch tokens `rows` (`[BLOCK]`): the sum over all T columns of the kernel of
    `sim - margin` (ELU, vision) or the valid-masked Gaussian of `1 - sim` (text), column block by
    column block; the caller divides by the count."""
    row_mask = rows < T
    u_r = _unit_rows(metric_ptr, P + rows, row_mask, D, DP)
    v_r = _valid_of(valid_ptr, P + rows, row_mask, HAS_VALID)
    total = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, T, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        col_mask = cols < T
        u_c = _unit_rows(metric_ptr, P + cols, col_mask, D, DP)
        v_c = _valid_of(valid_ptr, P + cols, col_mask, HAS_VALID)
        sim = _similarity(u_r, u_c, v_r, v_c, KIND == PITOME_TEXT, BROADCAST_DOT)
        if KIND == PITOME_TEXT:
            z = (1.0 - sim) / SIGMA
            f = tl.exp(-0.5 * (z * z)) / GAUSS_NORM * v_c[None, :]
        else:
            s = sim - MARGIN
            f = tl.where(s > 0, s, tl.exp(s) - 1.0)
        total += tl.sum(tl.where(col_mask[None, :], f, 0.0), axis=1)
    return total


@triton.jit
def _put_block(full, values, start, LENGTH: tl.constexpr, BLOCK: tl.constexpr):
    """`full [LENGTH]` with entries `start .. start + BLOCK` replaced by `values [BLOCK]` (register insert)."""
    grid = tl.reshape(full, [LENGTH // BLOCK, BLOCK])
    which = tl.arange(0, LENGTH // BLOCK)[:, None] == start // BLOCK
    return tl.reshape(tl.where(which, values[None, :], grid), [LENGTH])


@triton.jit
def _descending_order(scores, mask, LENGTH: tl.constexpr):
    """Indices of `scores [LENGTH]` from highest to lowest, ties to the lower index; masked lanes
    last. Sorts packed int64 keys: the score's order-preserving bits above the index's complement."""
    idx = tl.arange(0, LENGTH)
    bits = tl.where(scores == 0.0, 0.0, scores).to(tl.int32, bitcast=True)  # -0.0 ties with 0.0
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    top = tl.full([LENGTH], _INDEX_MASK, tl.int64)
    keys = tl.where(mask, (ordered << _INDEX_BITS) | (top - idx), _LAST_KEY)
    keys = tl.sort(keys, descending=True)
    return (top - (keys & _INDEX_MASK)).to(tl.int32)


@triton.jit
def _ascending(values, mask, LENGTH: tl.constexpr):
    """`values [LENGTH]` (distinct ints in [0, 2**30)) in ascending order, masked lanes last."""
    return tl.sort(tl.where(mask, values.to(tl.int32), _AFTER_ALL))


@triton.jit
def _take(full, index, LENGTH: tl.constexpr):
    """`full[index]` for an index vector, clamped into range (masked lanes read entry 0)."""
    return tl.gather(full, tl.minimum(tl.maximum(index, 0), LENGTH - 1), 0)


@triton.jit
def _row_energies(
    metric_ptr, valid_ptr, rows, T: tl.constexpr, P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    KIND: tl.constexpr, MARGIN: tl.constexpr, SIGMA: tl.constexpr, GAUSS_NORM: tl.constexpr,
    HAS_VALID: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr, BROADCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Energy `[BLOCK]` of patch tokens `rows`: the mean over all T (ELU, vision) or over the valid
    tokens (Gaussian, text; padding ranks first with `_PAD_ENERGY`), as `ops.merge` computes it."""
    total = _energy_rows(
        metric_ptr, valid_ptr, rows, T, P, D, DP, KIND, MARGIN, SIGMA, GAUSS_NORM, HAS_VALID, BLOCK, BROADCAST_DOT
    )
    if KIND == PITOME_TEXT:
        idx = tl.arange(0, TP)
        count = tl.sum(_valid_of(valid_ptr, P + idx, idx < T, HAS_VALID), axis=0)
        v_r = _valid_of(valid_ptr, P + rows, rows < T, HAS_VALID)
        return tl.where(v_r > 0, total / tl.maximum(count, 1.0), _PAD_ENERGY)
    return total / T


@triton.jit
def _ranking(
    metric_ptr, valid_ptr, energy_ptr, T: tl.constexpr, P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    KIND: tl.constexpr, MARGIN: tl.constexpr, SIGMA: tl.constexpr, GAUSS_NORM: tl.constexpr,
    HAS_VALID: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr, BROADCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Patch tokens in rank order `[TP]`: by energy, descending (PiToMe kinds), or by position (ToMe).
    Energies come from `energy_kernel`'s output when given, else are computed here, block by block."""
    idx = tl.arange(0, TP)
    if KIND == TOME:
        return idx
    if energy_ptr is not None:
        energy = tl.load(energy_ptr + idx, mask=idx < T, other=0.0)
    else:
        energy = tl.zeros([TP], tl.float32)
        for r0 in range(0, T, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            block = _row_energies(
                metric_ptr, valid_ptr, rows, T, P, D, DP, KIND, MARGIN, SIGMA, GAUSS_NORM, HAS_VALID, TP, BLOCK,
                BROADCAST_DOT,
            )  # fmt: skip
            energy = _put_block(energy, block, r0, TP, BLOCK)
    return _descending_order(energy, idx < T, TP)


@triton.jit
def energy_kernel(
    metric_ptr, valid_ptr, energy_ptr, N: tl.constexpr, D: tl.constexpr, P: tl.constexpr, KIND: tl.constexpr,
    MARGIN: tl.constexpr, SIGMA: tl.constexpr, GAUSS_NORM: tl.constexpr, HAS_VALID: tl.constexpr,
    TP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, BROADCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Energies `[T]` of batch element `program_id(0)`, rows block `program_id(1)`: the O(T^2 d) part
    of a PiToMe step spread over T / BLOCK programs per batch element (small batches fill the GPU)."""
    b = tl.program_id(0).to(tl.int64)
    T: tl.constexpr = N - P
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    metric_ptr += b * N * D
    if HAS_VALID:
        valid_ptr += b * N
    energy = _row_energies(
        metric_ptr, valid_ptr, rows, T, P, D, DP, KIND, MARGIN, SIGMA, GAUSS_NORM, HAS_VALID, TP, BLOCK, BROADCAST_DOT
    )
    tl.store(energy_ptr + b * T + rows, energy, mask=rows < T)


@triton.jit
def _best_matches(
    metric_ptr, valid_ptr, order, A0: tl.constexpr, AS: tl.constexpr, NA: tl.constexpr, B0: tl.constexpr,
    BS: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    PADDING_SAFE: tl.constexpr, HAS_VALID: tl.constexpr, TP: tl.constexpr, AP: tl.constexpr, BLOCK: tl.constexpr,
    BROADCAST_DOT: tl.constexpr,
):  # fmt: skip
    """For each A token k (rank `A0 + AS k`, k < NA) its best B match j (rank `B0 + BS j`, first max
    on ties) and that similarity: `([AP] fp32, [AP] int32)`."""
    best_score = tl.full([AP], float("-inf"), tl.float32)
    best_b = tl.zeros([AP], tl.int32)
    for a0 in range(0, NA, BLOCK):
        ks = a0 + tl.arange(0, BLOCK)
        a_mask = ks < NA
        a_tok = P + _take(order, A0 + AS * ks, TP)
        u_a = _unit_rows(metric_ptr, a_tok, a_mask, D, DP)
        v_a = _valid_of(valid_ptr, a_tok, a_mask, HAS_VALID)
        block_score = tl.full([BLOCK], float("-inf"), tl.float32)
        block_b = tl.zeros([BLOCK], tl.int32)
        for b0 in range(0, NB, BLOCK):
            js = b0 + tl.arange(0, BLOCK)
            b_mask = js < NB
            b_tok = P + _take(order, B0 + BS * js, TP)
            u_b = _unit_rows(metric_ptr, b_tok, b_mask, D, DP)
            v_b = _valid_of(valid_ptr, b_tok, b_mask, HAS_VALID)
            sim = tl.where(b_mask[None, :], _similarity(u_a, u_b, v_a, v_b, PADDING_SAFE, BROADCAST_DOT), float("-inf"))
            tile_score = tl.max(sim, axis=1)
            tile_b = tl.argmax(sim, axis=1, tie_break_left=True).to(tl.int32) + b0
            better = tile_score > block_score  # strict: an earlier B block keeps its tie
            block_b = tl.where(better, tile_b, block_b)
            block_score = tl.where(better, tile_score, block_score)
        best_score = _put_block(best_score, block_score, a0, AP, BLOCK)
        best_b = _put_block(best_b, block_b, a0, AP, BLOCK)
    return best_score, best_b


@triton.jit
def _combine(
    x_ptr, size_ptr, x_out_ptr, size_out_ptr, kept, member_tok, member_slot, N_OUT: tl.constexpr,
    C: tl.constexpr, NOP: tl.constexpr, AP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Size-weighted merge: slot s starts from token `kept[s]`; the merged tokens (`member_tok`,
    sorted by their slot `member_slot`) pull it by their share of the slot's size, as in
    `ops.merge.size_weighted_merge`: `x_d + sum_k s_k / S_d (x_k - x_d)`, `S_d = s_d + sum_k s_k`."""
    for s0 in range(0, N_OUT, BLOCK):
        slots = s0 + tl.arange(0, BLOCK)
        s_mask = slots < N_OUT
        kept_tok = _take(kept, slots, NOP)
        first = tl.sum((member_slot[None, :] < slots[:, None]).to(tl.int32), axis=1)
        count = tl.sum((member_slot[None, :] == slots[:, None]).to(tl.int32), axis=1)
        count = tl.where(s_mask, count, 0)
        rounds = tl.max(count, axis=0)
        slot_size = tl.load(size_ptr + kept_tok, mask=s_mask, other=0.0).to(tl.float32)
        j = 0
        while j < rounds:  # a while loop: Triton 3.6's interpreter takes no tensor range bound
            tok = _take(member_tok, first + j, AP)
            slot_size += tl.load(size_ptr + tok, mask=j < count, other=0.0).to(tl.float32)
            j += 1
        tl.store(size_out_ptr + slots, slot_size.to(size_out_ptr.dtype.element_ty), mask=s_mask)
        denom = tl.maximum(slot_size, 1e-12)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = s_mask[:, None] & (cols[None, :] < C)
            x_dest = tl.load(x_ptr + kept_tok[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            pull = tl.zeros([BLOCK, BLOCK_C], tl.float32)
            j = 0
            while j < rounds:
                has = j < count
                tok = _take(member_tok, first + j, AP)
                share = tl.load(size_ptr + tok, mask=has, other=0.0).to(tl.float32) / denom
                members = x_ptr + tok[:, None] * C + cols[None, :]
                x_member = tl.load(members, mask=mask & has[:, None], other=0.0).to(tl.float32)
                pull += tl.where(has[:, None], (x_member - x_dest) * share[:, None], 0.0)
                j += 1
            out = x_dest + pull
            tl.store(x_out_ptr + slots[:, None] * C + cols[None, :], out.to(x_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def token_merge_kernel(
    x_ptr, size_ptr, metric_ptr, valid_ptr, x_out_ptr, size_out_ptr, slots_ptr, energy_ptr,
    N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, P: tl.constexpr, R: tl.constexpr, KIND: tl.constexpr,
    MARGIN: tl.constexpr, SIGMA: tl.constexpr, GAUSS_NORM: tl.constexpr, HAS_VALID: tl.constexpr,
    TP: tl.constexpr, AP: tl.constexpr, NOP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr, BROADCAST_DOT: tl.constexpr,
):  # fmt: skip
    """One merge step of batch element `program_id(0)`: `x [N, C]`, `size [N]`, `metric [N, D]`
    (, `valid [N]`) -> `x_out [N - R, C]`, `size_out [N - R]` (, `slots [N]`: each token's slot).
    `energy [T]` from `energy_kernel`, or None: the energies are then computed here (TensorRT's AOT
    plugin, which launches one kernel)."""
    b = tl.program_id(0).to(tl.int64)
    T: tl.constexpr = N - P
    N_OUT: tl.constexpr = N - R
    metric_ptr += b * N * D
    x_ptr += b * N * C
    size_ptr += b * N
    x_out_ptr += b * N_OUT * C
    size_out_ptr += b * N_OUT
    if HAS_VALID:
        valid_ptr += b * N
    if energy_ptr is not None:
        energy_ptr += b * T
    order = _ranking(
        metric_ptr, valid_ptr, energy_ptr, T, P, D, DP, KIND, MARGIN, SIGMA, GAUSS_NORM, HAS_VALID, TP, BLOCK,
        BROADCAST_DOT,
    )  # fmt: skip
    # Which ranks form A and B: A_k = rank A0 + AS k (k < NA), B_j = rank B0 + BS j (j < NB).
    if KIND == PITOME:
        A0: tl.constexpr = 0
        AS: tl.constexpr = 2
        NA: tl.constexpr = R
        B0: tl.constexpr = 1
        BS: tl.constexpr = 2
        NB: tl.constexpr = R
    elif KIND == PITOME_TEXT:
        A0: tl.constexpr = 0
        AS: tl.constexpr = 1
        NA: tl.constexpr = R
        B0: tl.constexpr = R
        BS: tl.constexpr = 1
        NB: tl.constexpr = R
    elif KIND == PITOME_BSM:
        A0: tl.constexpr = 0
        AS: tl.constexpr = 2
        NA: tl.constexpr = (T + 1) // 2
        B0: tl.constexpr = 1
        BS: tl.constexpr = 2
        NB: tl.constexpr = T // 2
    else:  # ToMe: A/B by position parity in the full sequence (prefix tokens sit in A)
        A0: tl.constexpr = P % 2
        AS: tl.constexpr = 2
        NA: tl.constexpr = (T - P % 2 + 1) // 2
        B0: tl.constexpr = 1 - P % 2
        BS: tl.constexpr = 2
        NB: tl.constexpr = (T - (1 - P % 2) + 1) // 2
    padding_safe: tl.constexpr = KIND == PITOME_TEXT or (KIND == TOME and HAS_VALID)
    best_score, best_b = _best_matches(
        metric_ptr, valid_ptr, order, A0, AS, NA, B0, BS, NB, P, D, DP, padding_safe, HAS_VALID, TP, AP, BLOCK,
        BROADCAST_DOT,
    )  # fmt: skip
    ks = tl.arange(0, AP)
    slots_out = tl.arange(0, NOP)
    q = slots_out - P
    if KIND == PITOME or KIND == PITOME_TEXT:
        # [prefix, protected (ranks 2R..), B]; every A token merges into its best B.
        FIRST: tl.constexpr = P + T - 2 * R
        merged_k = ks
        protected_tok = P + _take(order, 2 * R + q, TP)
    else:
        # [prefix, unmerged A (in A order), B]; the R best-matched A tokens merge.
        FIRST: tl.constexpr = P + NA - R
        merged_k = _descending_order(best_score, ks < NA, AP)
        stay_k = _ascending(merged_k, (ks >= R) & (ks < NA), AP)
        protected_tok = P + _take(order, A0 + AS * _take(stay_k, q, AP), TP)
    merged_tok = P + _take(order, A0 + AS * merged_k, TP)
    merged_slot = FIRST + _take(best_b, merged_k, AP)
    b_tok = P + _take(order, B0 + BS * (slots_out - FIRST), TP)
    kept = tl.where(slots_out < P, slots_out, tl.where(slots_out < FIRST, protected_tok, b_tok))
    # Merged tokens sorted by (slot, merge order): each slot's members are one contiguous run.
    by_slot = _ascending(merged_slot * AP + ks, ks < R, AP)
    member_tok = _take(merged_tok, by_slot % AP, AP)
    member_slot = tl.where(ks < R, by_slot // AP, NOP)
    _combine(x_ptr, size_ptr, x_out_ptr, size_out_ptr, kept, member_tok, member_slot, N_OUT, C, NOP, AP, BLOCK, BLOCK_C)
    if slots_ptr is not None:
        slots_ptr += b * N
        tl.store(slots_ptr + kept, slots_out, mask=slots_out < N_OUT)
        tl.store(slots_ptr + merged_tok, merged_slot, mask=ks < R)


__all__ = ["energy_kernel", "token_merge_kernel"]
