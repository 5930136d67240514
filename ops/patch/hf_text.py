"""Token merging for Hugging Face BERT and DistilBERT encoders (and their task heads).

Merging happens inside a merging layer, on the attention sublayer's output (after its residual
and LayerNorm), before the feed-forward sublayer. The base model's forward is replaced by one
that runs the layers itself, so that the attention mask can follow the merged tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import BertModel, DistilBertModel
from transformers.utils import ModelOutput

from ops.errors import UnsupportedModelError
from ops.merge import MergeStep, TokenMerge
from ops.patch.surgery import add_attributes, swap_class
from ops.schedule import TokenSchedule

MERGE_LAYERS = (0, 1, 2)  # the reference merges in the first three layers only


@dataclass(frozen=True)
class TextFamily:
    """How one encoder family exposes the pieces a merging layer needs."""

    layers: Callable[[torch.nn.Module], torch.nn.ModuleList]
    embed: Callable[..., torch.Tensor]
    attention: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    key_proj: Callable[[torch.nn.Module], torch.nn.Linear]
    feed_forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    sum_heads: bool  # BERT sums keys over heads, DistilBERT averages (equal after L2 norm)


BERT = TextFamily(
    layers=lambda m: m.encoder.layer,
    embed=lambda m, ids, types, pos: m.embeddings(input_ids=ids, token_type_ids=types, position_ids=pos),
    attention=lambda layer, h, mask: layer.attention(h, mask)[0],
    key_proj=lambda layer: layer.attention.self.key,
    feed_forward=lambda layer, a: layer.feed_forward_chunk(a),
    sum_heads=True,
)

DISTILBERT = TextFamily(
    layers=lambda m: m.transformer.layer,
    embed=lambda m, ids, types, pos: m.embeddings(ids, None, pos),
    attention=lambda layer, h, mask: layer.sa_layer_norm(layer.attention(h, attention_mask=mask)[0] + h),
    key_proj=lambda layer: layer.attention.k_lin,
    feed_forward=lambda layer, a: layer.output_layer_norm(layer.ffn(a) + a),
    sum_heads=False,
)


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
    """Encoder output after merging: hidden states, the pooler output (BERT), the merged mask,
    and each output token's size (how many real input tokens it holds; 0 for padding).

    Mean pooling over a merged sequence weights each token by `token_sizes`: that is the same
    quantity as the attention-masked mean over the unmerged sequence. `hidden_states` and
    `attentions` stay None; task heads read them.
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
        sizes = valid
        heads = self.config.num_attention_heads
        for layer, token_merge in zip(fam.layers(self), self.token_merges):
            mask = additive_mask(valid, hidden.dtype)
            if token_merge.step.r == 0:
                hidden = layer(hidden, mask)
                continue
            attn_out = fam.attention(layer, hidden, mask)
            b, n, _ = hidden.shape
            keys = fam.key_proj(layer)(hidden).view(b, n, heads, -1)
            metric = keys.sum(dim=2) if fam.sum_heads else keys.mean(dim=2)
            weights = valid if self.padding_safe else torch.ones_like(valid)
            # The mask and the token sizes ride along as two more channels. The mask's weighted
            # mean is > 0 exactly when the group holds a real token (the max-merge of the mask);
            # the sizes' weighted mean times the group's weight is their sum.
            riders = torch.stack([valid, sizes], dim=-1)
            merged, group = token_merge(
                torch.cat([attn_out, riders], dim=-1), weights[..., None], metric, valid=weights
            )
            attn_out, valid = merged[..., :-2], (merged[..., -2] > 0).to(hidden.dtype)
            sizes = merged[..., -1] * group[..., 0]
            hidden = fam.feed_forward(layer, attn_out)
        pooler = getattr(self, "pooler", None)
        return MergedTextOutput(
            last_hidden_state=hidden,
            pooler_output=pooler(hidden) if pooler is not None else None,
            attention_mask=valid,
            token_sizes=sizes,
        )


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


def layer_steps(schedule: TokenSchedule, algo: str, lowering: str) -> list[MergeStep]:
    """Per-layer steps: Gaussian-energy PiToMe with margin 0.9 - 0.25 i/L (L = all layers)."""
    n = schedule.depth
    kind = "tome" if algo == "tome" else "pitome_text"
    return [MergeStep(kind, r, 0.9 - 0.25 * i / n, lowering) for i, r in enumerate(schedule.merges)]


def patch(model: torch.nn.Module, steps: list[MergeStep], padding_safe: bool, seq_len: int) -> None:
    base = base_model(model)
    swap_class(base, MergingTextEncoder)
    add_attributes(
        base, token_merges=torch.nn.ModuleList(TokenMerge(step, 1) for step in steps), padding_safe=padding_safe,
        frozen_seq_len=seq_len, text_family=family_of(base),
    )  # fmt: skip
