"""Token merging for Hugging Face vision transformers: ViT, CLIP's image tower and DINOv2.

The three are pre-norm ViTs that differ only in names, so one merging forward serves them all and
a `VisionFamily` record says where each piece lives. The base model's forward is replaced by one
that runs its layers itself: attention through SDPA (proportional attention as a `log(size)`
mask), then `TokenMerge`, then the MLP, carrying `size [B, N, 1]` from layer to layer. The class
token (and DINOv2's register tokens) are prefix tokens that never merge. Task heads that average
patch tokens (DINOv2's and CLIP's classifiers) are swapped for one that weights by token size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import CLIPVisionModel, Dinov2Model, Dinov2WithRegistersModel, ViTModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from ops.errors import UnsupportedModelError
from ops.patch.surgery import add_attributes, swap_class
from ops.patch.vision import merging_block, proportional_attention, size_weighted_mean
from ops.reduction import Reduction

# model_type -> why merging would compute it wrong (until each is supported).
REFUSED_MODEL_TYPES = {
    **dict.fromkeys(
        ("swin", "swinv2", "donut-swin", "maskformer-swin", "vitdet"),
        "windowed (shifted) attention over a patch grid, which merged tokens no longer form",
    ),
    **dict.fromkeys(
        ("beit", "data2vec-vision"), "relative position biases that assume the patch grid, which merged tokens leave"
    ),
    **dict.fromkeys(
        ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"),
        "an attention-pooling (MAP) head, whose attention over merged tokens needs their sizes",
    ),
    **dict.fromkeys(
        ("dinov3_vit", "pixtral", "eva"), "rotary position embeddings (RoPE) applied in every layer by patch position"
    ),
}


@dataclass(frozen=True)
class VisionFamily:
    """Where a family keeps each piece of its encoder, as data: layer parts are attribute names."""

    name: str
    flavor: str  # reference settings per layer (`ops.algos.pitome.vision_steps`)
    embed: Callable[[torch.nn.Module, torch.Tensor, bool], torch.Tensor]  # (base, pixels, interpolate) -> [B, N, C]
    layers: Callable[[torch.nn.Module], torch.nn.ModuleList]
    finish: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # -> (last, pooled)
    norm1: str
    attention: str
    norm2: str
    out_proj: str
    scale: str  # the attention module's softmax scale attribute
    layer_scales: tuple[str, str] | None = None  # DINOv2's LayerScale after each branch
    registers: Callable[[torch.nn.Module], int] = lambda base: 0


def _vit_finish(base: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    sequence = base.layernorm(hidden)
    return sequence, base.pooler(sequence) if base.pooler is not None else None


def _dinov2_finish(base: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sequence = base.layernorm(hidden)
    return sequence, sequence[:, 0]


VIT = VisionFamily(
    name="vit", flavor="deit",
    embed=lambda base, pixels, interpolate: base.embeddings(pixels, interpolate_pos_encoding=interpolate),
    layers=lambda base: base.layers, finish=_vit_finish,
    norm1="layernorm_before", attention="attention", norm2="layernorm_after", out_proj="o_proj", scale="scaling",
)  # fmt: skip
CLIP = VisionFamily(
    name="clip", flavor="clip",
    embed=lambda base, pixels, interpolate: base.pre_layrnorm(
        base.embeddings(pixels, interpolate_pos_encoding=interpolate)
    ),
    layers=lambda base: base.encoder.layers,
    finish=lambda base, hidden: (hidden, base.post_layernorm(hidden[:, 0])),
    norm1="layer_norm1", attention="self_attn", norm2="layer_norm2", out_proj="out_proj", scale="scale",
)  # fmt: skip
DINOV2 = VisionFamily(
    name="dinov2", flavor="deit",
    embed=lambda base, pixels, interpolate: base.embeddings(pixels),  # interpolates positions by itself
    layers=lambda base: base.encoder.layer, finish=_dinov2_finish,
    norm1="norm1", attention="attention", norm2="norm2", out_proj="o_proj", scale="scaling",
    layer_scales=("layer_scale1", "layer_scale2"),
)  # fmt: skip
DINOV2_REGISTERS = VisionFamily(**{**DINOV2.__dict__, "registers": lambda base: base.config.num_register_tokens})

BASES: tuple[tuple[type, VisionFamily], ...] = (
    (ViTModel, VIT),
    (CLIPVisionModel, CLIP),
    (Dinov2Model, DINOV2),
    (Dinov2WithRegistersModel, DINOV2_REGISTERS),
)
MODEL_TYPES = ("vit", "clip", "clip_vision_model", "dinov2", "dinov2_with_registers")


@dataclass
class MergedVisionOutput(ModelOutput):
    """Encoder output after merging: `last_hidden_state [B, n, C]` with the merged token count n,
    the family's pooled output, and `token_sizes [B, n, 1]` (patches each output token stands for),
    which any mean over tokens must weight by. `hidden_states`/`attentions` stay None."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    token_sizes: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _attention_branch(
    layer: torch.nn.Module, family: VisionFamily, prop_attn: bool, x: torch.Tensor, size: torch.Tensor, probs: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Norm, attention (and layer scale) of one layer on `x [B, N, C]`; also the keys averaged
    over heads `[B, N, d]`, the metric that ranks tokens for merging, and with `probs` the
    attention probabilities `[B, H, N, N]`."""
    attn = getattr(layer, family.attention)
    b, n, _ = x.shape
    h = getattr(layer, family.norm1)(x)
    q, k, v = (
        proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    out, weights = proportional_attention(q, k, v, size if prop_attn else None, getattr(attn, family.scale), probs)
    out = getattr(attn, family.out_proj)(out.transpose(1, 2).reshape(b, n, -1))
    if family.layer_scales:
        out = getattr(layer, family.layer_scales[0])(out)
    return out, k.mean(dim=1), weights


def _mlp_branch(layer: torch.nn.Module, family: VisionFamily, x: torch.Tensor) -> torch.Tensor:
    out = layer.mlp(getattr(layer, family.norm2)(x))
    return getattr(layer, family.layer_scales[1])(out) if family.layer_scales else out


class MergingVisionEncoder(torch.nn.Module):
    """Forward of a merging ViT/CLIP/DINOv2 base model; mixed into the model's own class."""

    vision_family: VisionFamily
    token_merges: torch.nn.ModuleList
    prop_attn: bool
    scheduled_tokens: int
    frozen_image_size: int

    def forward(self, pixel_values: torch.Tensor | None = None, **_: object) -> MergedVisionOutput:
        """`pixel_values [B, 3, S, S]` at the frozen image size S -> merged encoder output."""
        fam = self.vision_family
        interpolate = self.frozen_image_size != _config_image_size(self)
        hidden = fam.embed(self, pixel_values.to(self.dtype), interpolate)
        if hidden.shape[1] != self.scheduled_tokens:
            raise ValueError(
                f"the schedule was frozen for {self.scheduled_tokens} tokens but this input gives {hidden.shape[1]}: "
                f"use images of {self.frozen_image_size}x{self.frozen_image_size}"
            )
        size = hidden.new_ones(hidden.shape[0], hidden.shape[1], 1)
        for layer, token_merge in zip(fam.layers(self), self.token_merges):
            attention = partial(_attention_branch, layer, fam, self.prop_attn)
            hidden, size = merging_block(hidden, size, attention, partial(_mlp_branch, layer, fam), token_merge)
        last, pooled = fam.finish(self, hidden)
        return MergedVisionOutput(last_hidden_state=last, pooler_output=pooled, token_sizes=size)


class MergingPatchMeanClassifier(torch.nn.Module):
    """Forward of a classifier whose head reads the mean of the patch tokens (DINOv2: the class
    token beside it; CLIP's classifier: the mean alone), the mean weighted by token size."""

    num_prefix: int
    head_takes_cls: bool

    def forward(self, pixel_values: torch.Tensor | None = None, **_: object) -> ImageClassifierOutput:
        """`pixel_values [B, 3, S, S]` -> `logits [B, classes]`."""
        out = vision_base(self)(pixel_values)
        tokens, p = out.last_hidden_state, self.num_prefix
        features = size_weighted_mean(tokens[:, p:], out.token_sizes[:, p:])
        if self.head_takes_cls:
            features = torch.cat([tokens[:, 0], features], dim=1)
        return ImageClassifierOutput(logits=self.classifier(features))


def _config_image_size(base: torch.nn.Module) -> int:
    size = base.config.image_size
    return size[0] if isinstance(size, (list, tuple)) else size


def _patch_size(base: torch.nn.Module) -> int:
    size = base.config.patch_size
    return size[0] if isinstance(size, (list, tuple)) else size


def refusal(model: torch.nn.Module) -> str | None:
    """Why merging would compute this model wrong, or None (read from its config's model_type)."""
    config = getattr(model, "config", None)
    return REFUSED_MODEL_TYPES.get(getattr(config, "model_type", None))


def vision_base(model: torch.nn.Module) -> torch.nn.Module | None:
    """The ViT/CLIP-vision/DINOv2 encoder inside `model` (a task model, CLIPModel or the encoder itself), or None."""
    for candidate in (getattr(model, "vision_model", None), getattr(model, "base_model", None), model):
        if any(isinstance(candidate, cls) for cls, _ in BASES):
            return candidate
    return None


def family_of(base: torch.nn.Module) -> VisionFamily:
    return next(fam for cls, fam in BASES if isinstance(base, cls))


def check_supported(model: torch.nn.Module, image_size: int) -> None:
    """Refuse image sizes that do not tile into patches."""
    patch = _patch_size(vision_base(model))
    if image_size <= 0 or image_size % patch:
        raise UnsupportedModelError(f"image size {image_size} is not a positive multiple of the patch size {patch}")


def default_image_size(model: torch.nn.Module) -> int:
    """The image size the model was configured for (DINOv2 accepts others: pass `image_size`)."""
    return _config_image_size(vision_base(model))


def token_layout(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    """(patch tokens, prefix tokens: class + registers) at `image_size`."""
    base = vision_base(model)
    return (image_size // _patch_size(base)) ** 2, 1 + family_of(base).registers(base)


def depth(model: torch.nn.Module) -> int:
    base = vision_base(model)
    return len(family_of(base).layers(base))


def flavor_of(model: torch.nn.Module) -> str:
    return family_of(vision_base(model)).flavor


def _pooling_head(model: torch.nn.Module) -> bool | None:
    """For a classifier that averages patch tokens, whether its head also takes the class token;
    None for models without such a head (ViT's classifier reads the class token alone)."""
    if not hasattr(model, "classifier") or vision_base(model) is model:
        return None
    fam = family_of(vision_base(model))
    if fam.name == "dinov2":
        return True
    return False if fam.name == "clip" else None


def patch(model: torch.nn.Module, reductions: list[Reduction], prop_attn: bool, image_size: int) -> None:
    """Swap in the merging forward(s) and freeze each layer's reduction."""
    base = vision_base(model)
    num_tokens, num_prefix = token_layout(model, image_size)
    swap_class(base, MergingVisionEncoder)
    add_attributes(
        base, vision_family=family_of(base), prop_attn=prop_attn, scheduled_tokens=num_tokens + num_prefix,
        frozen_image_size=image_size, token_merges=torch.nn.ModuleList(reductions),
    )  # fmt: skip
    head_takes_cls = _pooling_head(model)
    if head_takes_cls is not None:
        swap_class(model, MergingPatchMeanClassifier)
        add_attributes(model, num_prefix=num_prefix, head_takes_cls=head_takes_cls)
