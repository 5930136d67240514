"""The one place that declares export inputs/outputs (Optimum's names) and example inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

VISION_INPUTS = ("pixel_values",)
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DISTILBERT_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class ModelSignature:
    """Input/output names of an exported model, and the fixed non-batch shape of each input."""

    kind: str  # "vision" or "text"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_shapes: dict  # name -> shape without the batch dim
    vocab_size: int = 0

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
    """Positional-input module around a model, returning its main output as a plain tensor."""

    def __init__(self, model: torch.nn.Module, signature: ModelSignature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.signature.kind == "vision":
            return self.model(inputs[0])
        out = self.model(**dict(zip(self.signature.input_names, inputs)))
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def signature_of(model: torch.nn.Module, seq_len: int | None = None) -> ModelSignature:
    """Names and shapes for a (patched or plain) timm ViT or HF BERT/DistilBERT model."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        pe = model.patch_embed
        shape = (pe.proj.in_channels, *pe.img_size)
        return ModelSignature("vision", VISION_INPUTS, ("logits",), {"pixel_values": shape})
    config = model.config
    merge_config = getattr(model, "merge_config", None) or {}
    seq_len = seq_len or merge_config.get("seq_len") or 128
    names = DISTILBERT_INPUTS if config.model_type == "distilbert" else BERT_INPUTS
    output = "logits" if hasattr(model, "classifier") else "last_hidden_state"
    return ModelSignature("text", names, (output,), {name: (seq_len,) for name in names}, vocab_size=config.vocab_size)
