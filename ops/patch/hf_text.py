"""Token reduction for Hugging Face BERT and DistilBERT encoders (and their task heads).

The first three layers reduce; each acts where its reduction says (`ops.reduction.Reduction.stage`):
on the attention sublayer's output (after its residual and LayerNorm), before the feed-forward
sublayer, or after the feed-forward sublayer's LayerNorm (DCT). The base model's forward is
replaced by one that runs the layers itself, so that the attention mask and the token sizes can
follow the reduced tokens, and computes the attention probabilities only for a reduction that
reads them (MCTF).

What follows the tokens (`TextTokens`): the attention mask, each token's size (the real input
tokens it holds, 0 for padding: what mean pooling weighs) and the size the algorithm itself
carries (MCTF's). PiToMe and ToMe merge with the mask as their weights, so mask and sizes ride
through their merge as two more channels of `x`; the baselines take the sizes as size channels
and say how they follow (summed per group, a pruned token's gone, DCT's spans), and the mask is
then "holds a real token" (the max-merge of the mask). DCT's output tokens blend every input
token, so no mask follows them: BERT's reference drops the mask after the first layer, DistilBERT's
resets it to ones after each reducing layer, and padding attends from there on.

The references are defined for unpadded input. `padding_safe` (the default) hands the mask to
the reductions as `valid`: PiToMe and ToMe match padding with padding and weigh it nothing, ToFu
prunes padding first, CrossGET's means leave it out; MCTF's attention weights give it none either
way, and DCT has no use for it. Without it the others take padding as a real token, as the
references do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import BertModel, DistilBertModel
from transformers.utils import ModelOutput

from ops.errors import UnsupportedModelError
from ops.merge import TokenMerge
from ops.patch.surgery import add_attributes, swap_class
from ops.reduction import Reduction, text_family_refusal

MERGE_LAYERS = (0, 1, 2)  # the reference merges in the first three layers only


@dataclass(frozen=True)
class TextFamily:
    """How one encoder family exposes the pieces a merging layer needs."""

    name: str  # as reductions name the families they run on (`Reduction.text_families`)
    label: str
    layers: Callable[[torch.nn.Module], torch.nn.ModuleList]
    embed: Callable[..., torch.Tensor]
    attention: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    key_proj: Callable[[torch.nn.Module], torch.nn.Linear]
    feed_forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    sum_heads: bool  # BERT sums keys over heads, DistilBERT averages (equal after L2 norm)
    self_attention: Callable[[torch.nn.Module], torch.nn.Module]  # holds the projections, head size, scaling
    projections: tuple[str, str, str]  # query, key, value Linear names in `self_attention`
    attention_output: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, context, h)
    unmasks_after_first_layer: bool  # with DCT: BERT's reference drops the mask after layer 0, DistilBERT's
    # resets it after each reducing layer


BERT = TextFamily(
    name="bert", label="BERT",
    layers=lambda m: m.encoder.layer,
    embed=lambda m, ids, types, pos: m.embeddings(input_ids=ids, token_type_ids=types, position_ids=pos),
    attention=lambda layer, h, mask: layer.attention(h, mask)[0],
    key_proj=lambda layer: layer.attention.self.key,
    feed_forward=lambda layer, a: layer.feed_forward_chunk(a),
    sum_heads=True,
    self_attention=lambda layer: layer.attention.self, projections=("query", "key", "value"),
    attention_output=lambda layer, context, h: layer.attention.output(context, h),
    unmasks_after_first_layer=True,
)  # fmt: skip

DISTILBERT = TextFamily(
    name="distilbert", label="DistilBERT",
    layers=lambda m: m.transformer.layer,
    embed=lambda m, ids, types, pos: m.embeddings(ids, None, pos),
    attention=lambda layer, h, mask: layer.sa_layer_norm(layer.attention(h, attention_mask=mask)[0] + h),
    key_proj=lambda layer: layer.attention.k_lin,
    feed_forward=lambda layer, a: layer.output_layer_norm(layer.ffn(a) + a),
    sum_heads=False,
    self_attention=lambda layer: layer.attention, projections=("q_lin", "k_lin", "v_lin"),
    attention_output=lambda layer, context, h: layer.sa_layer_norm(layer.attention.out_lin(context) + h),
    unmasks_after_first_layer=False,
)  # fmt: skip


FAMILIES = {family.name: family for family in (BERT, DISTILBERT)}


def family_of(base: torch.nn.Module) -> TextFamily:
    if isinstance(base, BertModel):
        if base.config.is_decoder:
            raise UnsupportedModelError("BERT as a decoder (causal attention, caches) is not supported")
        return BERT
    if isinstance(base, DistilBertModel):
        return DISTILBERT
    raise UnsupportedModelError(f"{type(base).__name__} is not a BertModel or DistilBertModel")


@dataclass
class MergedTextOutput(ModelOutput):
    """Encoder output after merging: hidden states, the pooler output (BERT), the mask the last
    layer attended with, and each output token's size (how many real input tokens it holds; 0
    for padding).

    Mean pooling over a merged sequence weights each token by `token_sizes`: that is the same
    quantity as the attention-masked mean over the unmerged sequence (a pruned token's size is
    gone with it; after DCT, the real tokens of the span each output token samples). `hidden_states`
    and `attentions` stay None; task heads read them.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    token_sizes: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[B, N]` 1/0 mask -> additive `[B, 1, 1, N]` attention bias."""
    return ((1.0 - valid) * torch.finfo(dtype).min)[:, None, None, :].to(dtype)


class TextTokens(NamedTuple):
    """What follows the tokens from layer to layer, each `[B, N]`: `valid` (1 attended, 0 masked),
    `sizes` (real input tokens held, 0 for padding) and `carried` (the size the reduction reads:
    MCTF's, which counts padding as the reference does; ones for the others)."""

    valid: torch.Tensor
    sizes: torch.Tensor
    carried: torch.Tensor


def attention_with_probabilities(
    fam: TextFamily, layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention sublayer on `hidden [B, N, C]` as the model's eager attention computes it
    (softmax of scaled scores plus the mask, no size term), keeping the probabilities
    `[B, H, N, N]` that the fused kernel never materialises: (sublayer output, probabilities)."""
    attn = fam.self_attention(layer)
    b, n, _ = hidden.shape
    q, k, v = (
        getattr(attn, name)(hidden).view(b, n, -1, attn.attention_head_size).transpose(1, 2) for name in fam.projections
    )
    probs = ((q @ k.transpose(-2, -1)) * attn.scaling + mask).softmax(dim=-1)
    context = (attn.dropout(probs) @ v).transpose(1, 2).reshape(b, n, -1)  # dropout: training only
    return fam.attention_output(layer, context, hidden), probs


class MergingTextEncoder(torch.nn.Module):
    """Forward of a merging BERT/DistilBERT base model; mixed into the model's own class."""

    token_merges: torch.nn.ModuleList
    padding_safe: bool
    frozen_seq_len: int
    text_family: TextFamily

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **_: object,
    ) -> MergedTextOutput:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("the merging encoder takes input_ids (not inputs_embeds)")
        if input_ids.shape[1] != self.frozen_seq_len:
            raise ValueError(
                f"this model was patched for sequence length {self.frozen_seq_len}, got {input_ids.shape[1]}: "
                "pad inputs to that length or re-patch with seq_len"
            )
        fam = self.text_family
        hidden = fam.embed(self, input_ids, token_type_ids, position_ids)
        valid = hidden.new_ones(hidden.shape[:2]) if attention_mask is None else attention_mask.to(hidden.dtype)
        tokens = TextTokens(valid, valid, torch.ones_like(valid))
        for index, (layer, reduction) in enumerate(zip(fam.layers(self), self.token_merges)):
            mask = additive_mask(tokens.valid, hidden.dtype)
            if reduction.r == 0:
                hidden = layer(hidden, mask)
            else:
                hidden, tokens = self._reducing_layer(layer, reduction, hidden, tokens, mask)
            # DCT's tokens blend everything: no mask follows them (when it goes: the family's reference)
            if reduction.mixes_tokens and (reduction.r > 0 or (index == 0 and fam.unmasks_after_first_layer)):
                tokens = tokens._replace(valid=torch.ones_like(tokens.valid))
        pooler = getattr(self, "pooler", None)
        return MergedTextOutput(
            last_hidden_state=hidden,
            pooler_output=pooler(hidden) if pooler is not None else None,
            attention_mask=tokens.valid,
            token_sizes=tokens.sizes,
        )

    def _reducing_layer(
        self, layer: torch.nn.Module, reduction: Reduction, hidden: torch.Tensor, tokens: TextTokens,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, TextTokens]:  # fmt: skip
        """One layer whose `reduction` acts where it says, on `hidden [B, N, C]` -> `[B, N - r, C]`."""
        fam = self.text_family
        if reduction.needs_attention:
            attn_out, probs = attention_with_probabilities(fam, layer, hidden, mask)
        else:
            attn_out, probs = fam.attention(layer, hidden, mask), None
        b, n, _ = hidden.shape
        keys = fam.key_proj(layer)(hidden).view(b, n, self.config.num_attention_heads, -1)
        metric = keys.sum(dim=2) if fam.sum_heads else keys.mean(dim=2)
        if reduction.stage == "mlp":
            return self._reduce(reduction, fam.feed_forward(layer, attn_out), metric, tokens, probs)
        attn_out, tokens = self._reduce(reduction, attn_out, metric, tokens, probs)
        return fam.feed_forward(layer, attn_out), tokens

    def _reduce(
        self, reduction: Reduction, x: torch.Tensor, metric: torch.Tensor, tokens: TextTokens,
        probs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, TextTokens]:  # fmt: skip
        """Run `reduction` on `x [B, N, C]` and let the mask and the sizes follow its tokens."""
        weights = tokens.valid if self.padding_safe else torch.ones_like(tokens.valid)
        if isinstance(reduction, TokenMerge):
            return _merge_with_riders(reduction, x, metric, tokens, weights)
        held = torch.stack([tokens.carried, tokens.sizes], dim=-1)
        x, held = reduction(x, held, metric, valid=weights, attention=probs)
        carried, sizes = held.unbind(dim=-1)
        return x, TextTokens((sizes > 0).to(x.dtype), sizes, carried)


def _merge_with_riders(
    merge: TokenMerge, x: torch.Tensor, metric: torch.Tensor, tokens: TextTokens, weights: torch.Tensor
) -> tuple[torch.Tensor, TextTokens]:
    """PiToMe/ToMe: a size-weighted merge with the mask as the weights (padding-safe) or ones.

    The mask and the token sizes ride along as two more channels. The mask's weighted mean is > 0
    exactly when the group holds a real token (the max-merge of the mask); the sizes' weighted
    mean times the group's weight is their sum.
    """
    riders = torch.stack([tokens.valid, tokens.sizes], dim=-1)
    merged, group = merge(torch.cat([x, riders], dim=-1), weights[..., None], metric, valid=weights)
    valid = (merged[..., -2] > 0).to(x.dtype)
    return merged[..., :-2], TextTokens(valid, merged[..., -1] * group[..., 0], torch.ones_like(valid))


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare encoder inside a task model (or the model itself)."""
    base = getattr(model, "base_model", model)
    family_of(base)
    return base


def token_layout(model: torch.nn.Module, seq_len: int) -> tuple[int, int]:
    """(non-prefix tokens, prefix tokens) for a fixed sequence length: the class token is prefix."""
    return seq_len - 1, 1


def depth(model: torch.nn.Module) -> int:
    return len(family_of(base_model(model)).layers(base_model(model)))


def patch(model: torch.nn.Module, reductions: list[Reduction], padding_safe: bool, seq_len: int) -> None:
    """Swap in the merging forward with one reduction per layer; refuses a reduction without a
    variant for this family (MCTF on DistilBERT)."""
    base = base_model(model)
    fam = family_of(base)
    for reduction in reductions:
        refusal = text_family_refusal(type(reduction), fam.name, fam.label)
        if refusal is not None:
            raise UnsupportedModelError(refusal)
    swap_class(base, MergingTextEncoder)
    add_attributes(
        base, token_merges=torch.nn.ModuleList(reductions), padding_safe=padding_safe,
        frozen_seq_len=seq_len, text_family=fam,
    )  # fmt: skip
