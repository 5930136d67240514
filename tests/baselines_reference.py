"""The baselines as ../shared/docs/baselines-algorithm.md defines them, written a second time, plainly:
one image at a time, Python lists and loops, stable sorts by (score, index), and the note's count
rules computed here again. Slow, and independent of `ops.algos`, whose fast batched versions the
fidelity tests hold against it. A timm ViT/DeiT without layer scale, class token only; and a
BERT/DistilBERT base model on unpadded sequences (the note's "Text" lines).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def ranked(scores: list[float]) -> list[int]:
    """Indices by descending score, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def first_best(row: list[float]) -> int:
    return max(range(len(row)), key=lambda j: (row[j], -j))


def unit(v: Tensor) -> Tensor:
    return v / v.norm()


# Count rules, from the note's table.


def removed_on_all_tokens(n: int, ratio: float) -> int:  # ToFu, MCTF: N with the class token
    return math.floor(n - n * ratio)


def removed_on_patches(t: int, ratio: float) -> int:  # CrossGET
    return math.floor(t - t * ratio)


def kept_by_dct(t: int, ratio: float) -> int:
    return math.ceil(t * ratio)


# One image's reduction per algorithm: x [N, C], keys mean [N, d], probabilities [H, N, N], size [N].


def tofu(x: Tensor, keys: Tensor, ratio: float, prune: bool) -> Tensor:
    n = x.shape[0]
    r = removed_on_all_tokens(n, ratio)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    m = [unit(k) for k in keys]
    best, score = [], []
    for i, a in enumerate(a_pos):
        row = [-math.inf if i == 0 else float(m[a] @ m[b]) for b in b_pos]
        best.append(first_best(row))
        score.append(row[best[-1]])
    order = ranked(score)
    sources, stay = order[:r], sorted(order[r:])
    kept_a = [x[a_pos[i]] for i in stay]
    if prune:
        return torch.stack(kept_a + [x[b] for b in b_pos])
    out_b = []
    for j, b in enumerate(b_pos):
        joined = [x[a_pos[i]] for i in sources if best[i] == j]
        if not joined:
            out_b.append(x[b])
            continue
        mean = (x[b] + sum(joined)) / (1 + len(joined))
        largest = max([x[b].norm()] + [s.norm() for s in joined])
        out_b.append(mean * largest / x[b].norm())
    return torch.stack(kept_a + out_b)


def dct_ortho(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along dim 0 by the FFT (Makhoul's reordering), in float64."""
    n = x.shape[0]
    v = torch.cat([x[0::2], x[1::2].flip(0)]).to(torch.float64)
    spectrum = torch.fft.fft(v, dim=0)
    k = torch.arange(n, dtype=torch.float64)[:, None] * math.pi / (2 * n)
    out = 2 * (spectrum.real * torch.cos(k) + spectrum.imag * torch.sin(k))
    out[0] /= math.sqrt(n) * 2
    out[1:] /= math.sqrt(n / 2) * 2
    return out


def idct_ortho(coefficients: Tensor) -> Tensor:
    """Orthonormal DCT-III (the inverse) along dim 0, as the sum it is, in float64."""
    n = coefficients.shape[0]
    out = []
    for i in range(n):
        terms = [
            (1 / math.sqrt(2) if k == 0 else 1.0) * math.cos(math.pi * k * (2 * i + 1) / (2 * n)) * coefficients[k]
            for k in range(n)
        ]
        out.append(math.sqrt(2 / n) * sum(terms))
    return torch.stack(out)


def dct(x: Tensor, ratio: float) -> Tensor:
    patches = x[1:]
    kept = kept_by_dct(patches.shape[0], ratio)
    y = idct_ortho(dct_ortho(patches)[:kept]).to(torch.float32).to(torch.float16).to(torch.float32)
    return torch.cat([x[:1], y])


def crossget(x: Tensor, keys: Tensor, ratio: float) -> Tensor:
    patches, t = x[1:], x.shape[0] - 1
    r = removed_on_patches(t, ratio)
    m = torch.stack([k / max(float(k.norm()), 1e-12) for k in keys[1:]])
    d = m @ m.T - torch.eye(t)
    sym = (d + d.T) / 2
    p = ranked([float(sym[i].max()) for i in range(t)])
    g = []
    for i in range(t):
        row = [float(d[p[i], p[j]]) - (1e9 if j <= i else 0.0) for j in range(t)]
        g.append(max(row))
    q = ranked(g)  # ranks, used as positions: the authors' code
    merged = (patches[q[r]] + sum((patches[q[k]] for k in range(r)), torch.zeros_like(patches[0]))) / (r + 1)
    return torch.stack([x[0], merged] + [patches[q[k]] for k in range(r + 1, t)])


def mctf(x: Tensor, keys: Tensor, probs: Tensor, size: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    n = x.shape[0]
    r = removed_on_all_tokens(n, ratio)
    r1, r2 = r // 2, r - r // 2
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    m = [unit(k) for k in keys]
    inv = [1.0 / float(s) for s in size]
    u = [v / max(inv) for v in inv]

    def w(a: int, b: int) -> float:
        return (float(m[a] @ m[b]) + 1) / 2 * (u[a] * u[b]) ** (1 / 40)

    fwd_best, fwd_score = [], []
    for i, a in enumerate(a_pos):
        row = [-math.inf if i == 0 else w(a, b) for b in b_pos]
        fwd_best.append(first_best(row))
        fwd_score.append(row[fwd_best[-1]])
    order_a = ranked(fwd_score)
    s1, u1 = order_a[:r1], sorted(order_a[r1:])
    back_best, back_score = [], []
    for b in b_pos:
        row = [-math.inf if a_pos[i] == 0 else w(a_pos[i], b) for i in u1]
        back_best.append(first_best(row))
        back_score.append(row[back_best[-1]])
    order_b = ranked(back_score)
    s2, u2 = order_b[:r2], order_b[r2:]
    received = probs.mean(dim=(0, 1))
    weight = [float(received[i] * size[i] / size.max()) for i in range(n)]
    groups = {("b", j): [b_pos[j]] for j in range(len(b_pos))}  # stage 1: B tokens gather their A sources
    for i in s1:
        groups[("b", fwd_best[i])].append(a_pos[i])
    final = {("a", i): [a_pos[i]] for i in u1}  # stage 2: U1 tokens gather B sources with theirs
    for j in s2:
        final[("a", u1[back_best[j]])] += groups[("b", j)]
    slots = [final[("a", i)] for i in u1] + [groups[("b", j)] for j in u2]
    out_x = [sum(x[t] * weight[t] for t in g) / sum(weight[t] for t in g) for g in slots]
    out_s = [sum(float(size[t]) for t in g) for g in slots]
    return torch.stack(out_x), torch.tensor(out_s)


def diffrate(x: Tensor, probs: Tensor, size: Tensor, kept: int, prune_kept: int) -> tuple[Tensor, Tensor]:
    """`kept`, `prune_kept`: the note's merge-kept and prune-kept counts, class token included."""
    class_attention = [float(probs[:, 0, i].mean()) for i in range(1, x.shape[0])]
    order = [0] + [1 + i for i in ranked(class_attention)]
    order = order[:prune_kept]
    important, rest = order[:kept], order[kept:]
    m = {t: unit(x[t]) for t in order}
    out_x = {t: [x[t]] for t in important}
    out_s = {t: float(size[t]) for t in important}
    for t in rest:
        row = [-math.inf if d == 0 else float(m[t] @ m[d]) for d in important]
        best = first_best(row)
        out_x[important[best]].append(x[t])
        out_s[important[best]] += float(size[t]) * row[best]
    return torch.stack([sum(out_x[t]) / len(out_x[t]) for t in important]), torch.tensor([out_s[t] for t in important])


# A whole DeiT forward with one of them.


def attention(block, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Manual attention of a timm block on one image `x [N, C]`: (output, keys mean, probabilities)."""
    attn = block.attn
    n = x.shape[0]
    qkv = attn.qkv(block.norm1(x)).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)
    logits = q @ k.transpose(-2, -1) * attn.scale
    if size is not None:
        logits = logits + size.log()[None, None, :]
    probs = logits.softmax(-1)
    out = attn.proj((probs @ v).transpose(0, 1).reshape(n, -1))
    return out, k.mean(0), probs


def diffrate_counts(patches: int, depth: int, ratio: float) -> list[tuple[int, int]]:
    """(prune-kept, merge-kept) per block, class token included: `k` starts at the patch count."""
    k, counts = patches, []
    for _ in range(depth):
        r = math.floor(k - k * ratio)
        counts.append((k, k - r))
        k -= r
    return counts


@torch.no_grad()
def forward(model, images: Tensor, algo: str, ratio: float) -> Tensor:
    """Logits `[B, classes]` of a timm DeiT with `algo` at `ratio`, one image at a time."""
    depth = len(model.blocks)
    counts = diffrate_counts(model.patch_embed.num_patches, depth, ratio)
    logits = []
    for image in images:
        x = model._pos_embed(model.patch_embed(image[None]))[0]
        size = torch.ones(x.shape[0])
        for i, block in enumerate(model.blocks):
            out, keys, probs = attention(block, x, size if algo in ("mctf", "diffrate") else None)
            x = x + out
            if algo == "tofu":
                x = tofu(x, keys, ratio, prune=i <= depth // 2)
            elif algo == "crossget":
                x = crossget(x, keys, ratio)
            elif algo == "mctf":
                x, size = mctf(x, keys, probs, size, ratio)
            elif algo == "diffrate":
                x, size = diffrate(x, probs, size, counts[i][1], counts[i][0])
            x = x + block.mlp(block.norm2(x))
            if algo == "dct":
                x = dct(x, ratio)
        logits.append(model.head(model.norm(x)[0]))
    return torch.stack(logits)


# A whole BERT/DistilBERT forward with one of them (the note's "Text" lines): unpadded sequences.

TEXT_REDUCING_LAYERS = 3  # the authors' ratio list marks three layers and is consumed from the end: the first three


def text_attention(layer, h: Tensor, distil: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One sequence `h [N, C]` through a BERT/DistilBERT attention sublayer by hand (softmax of
    `q k^T / sqrt(d)`, no mask, no size term): (output after its residual and LayerNorm, keys
    `[H, N, d]`, probabilities `[H, N, N]`)."""
    attn = layer.attention if distil else layer.attention.self
    projections = (attn.q_lin, attn.k_lin, attn.v_lin) if distil else (attn.query, attn.key, attn.value)
    n, d = h.shape[0], attn.attention_head_size
    q, k, v = (proj(h).reshape(n, -1, d).transpose(0, 1) for proj in projections)
    probs = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1)
    context = (probs @ v).transpose(0, 1).reshape(n, -1)
    if distil:
        return layer.sa_layer_norm(attn.out_lin(context) + h), k, probs
    out = layer.attention.output
    return out.LayerNorm(out.dense(context) + h), k, probs


def text_feed_forward(layer, a: Tensor, distil: bool) -> Tensor:
    """The feed-forward sublayer on one sequence `a [N, C]`, after its residual and LayerNorm."""
    if distil:
        return layer.output_layer_norm(layer.ffn(a) + a)
    return layer.output(layer.intermediate(a), a)


@torch.no_grad()
def text_forward(model, input_ids: Tensor, algo: str, ratio: float) -> Tensor:
    """Last hidden states `[B, N_out, C]` of a BERT/DistilBERT base model with `algo` at `ratio`
    in its first three layers, one unpadded sequence at a time. Metrics: keys mean (ToFu, MCTF,
    and CrossGET on DistilBERT), keys summed over heads (CrossGET on BERT)."""
    distil = model.config.model_type == "distilbert"
    layers = model.transformer.layer if distil else model.encoder.layer
    outputs = []
    for ids in input_ids:
        x = (model.embeddings(ids[None]) if distil else model.embeddings(input_ids=ids[None]))[0]
        size = torch.ones(x.shape[0])
        for i, layer in enumerate(layers):
            a, keys, probs = text_attention(layer, x, distil)
            reduces = i < TEXT_REDUCING_LAYERS and ratio < 1.0
            if reduces and algo == "tofu":
                a = tofu(a, keys.mean(0), ratio, prune=True)
            elif reduces and algo == "crossget":
                a = crossget(a, keys.mean(0) if distil else keys.sum(0), ratio)
            elif reduces and algo == "mctf":
                a, size = mctf(a, keys.mean(0), probs, size, ratio)
            x = text_feed_forward(layer, a, distil)
            if reduces and algo == "dct":
                x = dct(x, ratio)
        outputs.append(x)
    return torch.stack(outputs)
