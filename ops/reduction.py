"""What a layer's token reduction is to the block that runs it: one module interface for every
algorithm (PiToMe, ToMe and the baselines of `ops.algos`).

A block calls its reduction with the tokens and what the algorithm reads, and gets fewer tokens
back: `reduction(x [B, N, C], size [B, N, 1], metric [B, N, d], valid [B, N] | None,
attention [B, H, N, N] | None) -> (x [B, N - r, C], size [B, N - r, 1])`. Where it acts
(`stage`) and whether it needs the attention probabilities (`needs_attention`, which makes the
block compute attention without the fused kernel) are class facts the patches read, as are
whether its output tokens blend all its inputs (`mixes_tokens`: no mask can follow them) and the
text encoder families it has a variant for (`text_families`). `size` may hold more channels
(`[B, N, K]`) for the baselines: channel 0 is the size the algorithm reads, and every channel
follows the tokens as the reduction says (text models carry the real-token count that way).
Decisions live in a submodule named `assign` and the arithmetic in one named `combine`, so that an
export names their nodes by scope and reduced-precision passes keep them in FP32.
"""

from __future__ import annotations

import copy

import torch

STAGES = ("attention", "mlp")  # after the attention residual (before the MLP), or after the MLP residual


class Reduction(torch.nn.Module):
    """One layer's reduction of `r` tokens; subclasses implement `reduce`."""

    stage: str = "attention"
    needs_attention: bool = False
    mixes_tokens: bool = False  # each output token blends all input tokens (DCT): no mask follows them
    rounds: bool = False  # its output goes through a float16 round trip (DCT): a decision per value
    text_families: tuple[str, ...] = ("bert", "distilbert")  # the text encoders it has a variant for

    def __init__(self, r: int, num_prefix: int) -> None:
        super().__init__()
        self.r, self.num_prefix = r, num_prefix

    def forward(
        self,
        x: torch.Tensor,
        size: torch.Tensor,
        metric: torch.Tensor,
        valid: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [B, N, C]`, `size [B, N, 1]` -> N - r tokens; prefix tokens stay first, untouched."""
        if self.r == 0:
            return x, size
        return self.reduce(x, size, metric, valid, attention)

    def reduce(self, x, size, metric, valid, attention) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def text_family_refusal(reduction: type[Reduction], family: str, label: str) -> str | None:
    """Why `reduction` cannot run on the text family `family` (shown as `label`), or None."""
    if family in reduction.text_families:
        return None
    return (
        f"{reduction.__name__.lower()} has no {label} variant "
        f"(it runs on {', '.join(reduction.text_families)} only: the reference's {label} patch does not run)"
    )


class KeepFirst(Reduction):
    """A reduction's stand-in that keeps the first N - r tokens where the reduction acted: the
    reduced schedule's shapes without the reduction's work (attention probabilities included, for
    the algorithms that read them). A reduced graph's latency minus its twin's is what the
    reduction costs end to end; the twin's one Slice per layer stays in, so the cost is slightly
    understated."""

    def __init__(self, reduction: Reduction) -> None:
        super().__init__(reduction.r, reduction.num_prefix)
        self.stage = reduction.stage

    def reduce(self, x, size, metric, valid=None, attention=None) -> tuple[torch.Tensor, torch.Tensor]:
        keep = x.shape[1] - self.r
        return x[:, :keep], size[:, :keep]


def without_reduction(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a patched model whose every reduction keeps the first N - r tokens instead
    (`KeepFirst`); the model itself is left as it was."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Reduction) and not isinstance(module, KeepFirst):
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, KeepFirst(module))
    return twin
