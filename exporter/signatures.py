"""The one place that declares export inputs/outputs (Optimum's names) and example inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

VISION_INPUTS = ("pixel_values",)
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DISTILBERT_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class ModelSignature:
    """Input/output names of an exported model, and the fixed non-batch shape of each input.

    A model returning a `ModelOutput` is read by `output_fields` (default: the output names), in
    order; `entry` names the method to call instead of forward (CLIPModel's `get_image_features`).
    """

    kind: str  # "vision" or "text"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_shapes: dict  # name -> shape without the batch dim
    vocab_size: int = 0
    output_fields: tuple[str, ...] = ()
    entry: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        return self.output_fields or self.output_names

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded synthetic inputs; text inputs get a class token first and varied padding."""
        gen = torch.Generator().manual_seed(seed)
        if self.kind == "vision":
            return {"pixel_values": torch.randn(batch, *self.input_shapes["pixel_values"], generator=gen)}
        (seq_len,) = self.input_shapes["input_ids"]
        ids = torch.randint(1000 if self.vocab_size > 2000 else 1, self.vocab_size, (batch, seq_len), generator=gen)
        ids[:, 0] = 101 if self.vocab_size > 101 else 0
        mask = torch.ones(batch, seq_len, dtype=torch.int64)
        for row in range(1, batch):  # first row unpadded, the others padded to random lengths
            length = int(torch.randint(seq_len // 2, seq_len, (1,), generator=gen))
            mask[row, length:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = torch.zeros_like(ids)
        return feeds


class ExportWrapper(torch.nn.Module):
    """Positional-input module around a model, returning its outputs as plain tensors: one
    tensor for a one-output signature, else a tuple in `output_names` order."""

    def __init__(self, model: torch.nn.Module, signature: ModelSignature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        sig = self.signature
        call = getattr(self.model, sig.entry) if sig.entry else self.model
        out = call(inputs[0]) if sig.kind == "vision" else call(**dict(zip(sig.input_names, inputs)))
        if isinstance(out, torch.Tensor):  # timm models return their logits
            return out
        values = tuple(getattr(out, field) for field in sig.fields)
        return values[0] if len(values) == 1 else values


def as_outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """An `ExportWrapper` result as a tuple of its outputs."""
    return out if isinstance(out, tuple) else (out,)


def signature_of(model: torch.nn.Module, seq_len: int | None = None) -> ModelSignature:
    """Names and shapes for a (patched or plain) timm ViT, HF vision model or HF BERT/DistilBERT model."""
    from timm.models.vision_transformer import VisionTransformer

    from ops.patch import hf_vision

    if isinstance(model, VisionTransformer):
        pe = model.patch_embed
        shape = (pe.proj.in_channels, *pe.img_size)
        return ModelSignature("vision", VISION_INPUTS, ("logits",), {"pixel_values": shape})
    if hf_vision.vision_base(model) is not None:
        return hf_vision_signature(model)
    config = model.config
    merge_config = getattr(model, "merge_config", None) or {}
    seq_len = seq_len or merge_config.get("seq_len") or 128
    names = DISTILBERT_INPUTS if config.model_type == "distilbert" else BERT_INPUTS
    output = "logits" if hasattr(model, "classifier") else "last_hidden_state"
    return ModelSignature("text", names, (output,), {name: (seq_len,) for name in names}, vocab_size=config.vocab_size)


def hf_vision_signature(model: torch.nn.Module) -> ModelSignature:
    """`pixel_values` -> `logits` for classifiers; for feature models the hidden states (their
    token count is the merged one) and the pooled output, named as optimum names them:
    `pooler_output`, or `image_embeds` for CLIP's projected embedding."""
    from transformers import CLIPModel

    from ops.patch import hf_vision

    base = hf_vision.vision_base(model)
    merge_config = getattr(model, "merge_config", None) or {}
    size = merge_config.get("image_size") or hf_vision.default_image_size(model)
    shapes = {"pixel_values": (base.config.num_channels, size, size)}
    if isinstance(model, CLIPModel):  # the image tower of a full CLIP: get_image_features projects
        names, fields = ("image_embeds", "last_hidden_state"), ("pooler_output", "last_hidden_state")
        return ModelSignature("vision", VISION_INPUTS, names, shapes, output_fields=fields, entry="get_image_features")
    if hasattr(model, "classifier"):
        return ModelSignature("vision", VISION_INPUTS, ("logits",), shapes)
    if hasattr(model, "visual_projection"):
        return ModelSignature("vision", VISION_INPUTS, ("image_embeds", "last_hidden_state"), shapes)
    pooled = ("pooler_output",) if getattr(base, "pooler", True) is not None else ()
    return ModelSignature("vision", VISION_INPUTS, ("last_hidden_state", *pooled), shapes)
