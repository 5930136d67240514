"""DCT token reduction (frequency truncation), as the PiToMe authors' code runs it.

After the MLP residual of every reducing block, the non-prefix tokens `x_p [B, T, C]` (in their
current order) go through an orthonormal DCT-II of length T along the token axis, keep the T'
lowest frequencies and come back through an orthonormal inverse of length T': one constant
`[T', T]` matrix per layer. The result is rounded to float16 and back, as the authors' cast to
half does (it moves DeiT-Tiny logits by up to 1.4e-4). That rounding is DCT's only decision: a
value within float32 noise of a float16 midpoint rounds up in one runtime and down in another,
so it goes through the decision tape (kind "round") and parity can force the graph's roundings
into the reference (`exporter.near_ties`). No size (ones).

Text (BERT, DistilBERT): the same transform after the feed-forward sublayer's LayerNorm of the
merging layers, the class token kept. An output token blends every input token, so no attention
mask can follow it (`mixes_tokens`): the encoder then attends to everything, as the reference
does (`ops.patch.hf_text`). Mean pooling still needs a weight per output token: the inverse
transform of length T' samples the low-passed sequence at the centres of T' equal spans of the
T input positions, so output token i is given the real input tokens of its span
`[i T/T', (i+1) T/T')` (fractions at the span ends): each token's weight is what it samples,
padding weighs nothing, and the weights still add up to the sequence's real tokens.
"""

from __future__ import annotations

import math

import torch

from ops.decision_tape import taped
from ops.reduction import Reduction
from ops.schedule import TokenSchedule


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II `[n, n]` in float64: `C[k, i] = c_k sqrt(2/n) cos(pi k (2i + 1) / (2n))`."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = math.sqrt(2.0 / n) * torch.cos(math.pi * k * (2 * i + 1) / (2 * n))
    matrix[0] /= math.sqrt(2.0)
    return matrix


def truncation(tokens: int, kept: int) -> torch.Tensor:
    """`[kept, tokens]`: DCT-II of length `tokens`, the `kept` lowest frequencies, inverse of length `kept`."""
    return (dct_matrix(kept).T @ dct_matrix(tokens)[:kept]).to(torch.float32)


def span_overlaps(tokens: int, kept: int) -> torch.Tensor:
    """`[kept, tokens]`: how much of input token j (the interval `[j, j+1)`) lies in output span i
    (`[i w, (i+1) w)`, `w = tokens / kept`). Columns add up to 1, rows to `w`."""
    width = tokens / kept
    starts = torch.arange(kept, dtype=torch.float64)[:, None] * width
    j = torch.arange(tokens, dtype=torch.float64)[None, :]
    return (torch.minimum(starts + width, j + 1) - torch.maximum(starts, j)).clamp_min(0.0).to(torch.float32)


class FrequencyTruncation(torch.nn.Module):
    """`x_p [B, T, C]` -> `[B, T', C]` by the layer's constant matrix, rounded through float16; the
    size channels `[B, T, K]` -> ones, or with `span_sizes` summed over each output token's span."""

    def __init__(self, tokens: int, kept: int, span_sizes: bool = False) -> None:
        super().__init__()
        self.register_buffer("matrix", truncation(tokens, kept), persistent=False)
        self.register_buffer("spans", span_overlaps(tokens, kept) if span_sizes else None, persistent=False)

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low_passed = self.matrix.to(x.dtype) @ x
        out = taped("round", low_passed, low_passed.to(torch.float16).to(x.dtype))
        if self.spans is None:
            return out, size.new_ones(out.shape[0], out.shape[1], size.shape[-1])
        return out, self.spans.to(size.dtype) @ size


class DCT(Reduction):
    """One DCT layer: `T` non-prefix tokens -> `T - r` frequencies; prefix tokens untouched.
    Sizes are ones after it, or with `span_sizes` (text) what each output token's span held."""

    stage = "mlp"
    mixes_tokens = True
    rounds = True

    def __init__(self, r: int, num_prefix: int, tokens: int, span_sizes: bool = False) -> None:
        super().__init__(r, num_prefix)
        self.combine = FrequencyTruncation(tokens, tokens - r, span_sizes) if r else None

    def reduce(self, x, size, metric, valid, attention):
        p = self.num_prefix
        out, out_size = self.combine(x[:, p:], size[:, p:])
        return torch.cat([x[:, :p], out], dim=1), torch.cat([size[:, :p], out_size], dim=1)


def vision_reductions(schedule: TokenSchedule, flavor: str, lowering: str) -> list[DCT]:
    return [DCT(r, schedule.num_prefix, t) for t, r in zip(schedule.tokens, schedule.merges)]


def text_reductions(schedule: TokenSchedule, lowering: str) -> list[DCT]:
    """The merging layers of a BERT/DistilBERT; sizes follow the spans (what mean pooling weighs)."""
    return [DCT(r, schedule.num_prefix, t, span_sizes=True) for t, r in zip(schedule.tokens, schedule.merges)]
