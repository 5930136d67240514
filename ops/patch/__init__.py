"""`patch_model` / `unpatch_model`: the one public entry point for model surgery.

One small module per model family (`timm_vit`, `hf_vision`, `hf_text`) holds its subclasses; this module picks
the family, freezes the schedule, and records it on the model as `model.token_schedule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ops.algos import algorithm, text_layers, vision_layers
from ops.errors import UnsupportedModelError
from ops.merge import LOWERINGS, MERGE_IMPLS, TokenMerge
from ops.patch import hf_text, hf_vision, timm_vit
from ops.reduction import Reduction
from ops.schedule import TokenSchedule, build_schedule

DEFAULT_TEXT_SEQ_LEN = 128
VISION_FAMILIES = ("timm_vit", "hf_vision")
FUSED_ALGOS = ("pitome", "tome")  # the fused merge kernels' algorithms


def _step_name(reduction: Reduction, algo: str) -> str:
    """What a layer runs, for `merge_config["steps"]`: PiToMe's variant, else the algorithm."""
    if not reduction.r:
        return "none"
    return reduction.step.kind if isinstance(reduction, TokenMerge) else algo


def _family(model: torch.nn.Module) -> str:
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "timm_vit"
    reason = hf_vision.refusal(model)
    if reason is not None:
        raise UnsupportedModelError(f"{type(model).__name__} is not supported: {reason}")
    if hf_vision.vision_base(model) is not None:
        return "hf_vision"
    try:
        hf_text.base_model(model)
    except UnsupportedModelError:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: patch_model takes timm VisionTransformer models, "
            "Hugging Face ViT, CLIP (vision), DINOv2 and BERT/DistilBERT models"
        ) from None
    return "hf_text"


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the original classes of a patched model (no-op on an unpatched one)."""
    for module in list(model.modules()):
        original = module.__dict__.pop("_pitome_original_class", None)
        if original is not None:
            module.__class__ = original
        for name in module.__dict__.pop("_pitome_added", ()):
            delattr(module, name)
    model.__dict__.pop("token_schedule", None)
    model.__dict__.pop("merge_config", None)
    return model


def patch_model(
    model: torch.nn.Module,
    algo: str = "pitome",
    ratio: float | None = 0.9,
    schedule: list[int] | None = None,
    prop_attn: bool | None = None,
    lowering: str = "matmul",
    *,
    seq_len: int | None = None,
    image_size: int | None = None,
    flavor: str | None = None,
    padding_safe: bool = True,
    merge_impl: str = "decomposed",
) -> torch.nn.Module:
    """Patch `model` in place with token merging and return it.

    `ratio` (fraction of tokens kept per merging layer) or an explicit `schedule` (tokens merged
    per layer) is frozen into `model.token_schedule`. `prop_attn` defaults to the reference's
    choice (off for PiToMe, on for ToMe on vision models). Text models need a fixed `seq_len` (default 128);
    Hugging Face vision models a fixed `image_size` (default: the configured one; DINOv2 takes others);
    `padding_safe=False` reproduces the reference's padding behaviour. `merge_impl="fused"` runs
    each merge step as the one `pitome::token_merge` operator: on CUDA the fused Triton kernel
    (`ops.kernels`), elsewhere the same decomposed code. Calling it again re-patches;
    `unpatch_model` restores the original model.
    """
    if lowering not in LOWERINGS:
        raise UnsupportedModelError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    if merge_impl not in MERGE_IMPLS:
        raise UnsupportedModelError(f"unknown merge_impl {merge_impl!r}; choose one of {', '.join(MERGE_IMPLS)}")
    if schedule is not None:
        ratio = None
    unpatch_model(model)
    family = _family(model)
    if prop_attn is None:
        prop_attn = algorithm(algo).prop_attn and family in VISION_FAMILIES
    merging = _Merging(algo, ratio, schedule, lowering)
    if family == "timm_vit":
        token_schedule, steps, config = _patch_timm(model, merging, prop_attn, flavor)
    elif family == "hf_vision":
        token_schedule, steps, config = _patch_hf_vision(model, merging, prop_attn, flavor, image_size)
    else:
        token_schedule, steps, config = _patch_text(model, merging, prop_attn, seq_len, padding_safe)
    if merge_impl == "fused" and algo not in FUSED_ALGOS:
        raise UnsupportedModelError(f"the fused merge implements {' and '.join(FUSED_ALGOS)}, not {algo}")
    for merge in model.modules():
        if isinstance(merge, TokenMerge):
            merge.fused = merge_impl == "fused"
    model.token_schedule = token_schedule
    model.merge_config = {
        "algo": algo,
        "ratio": ratio,
        "prop_attn": prop_attn,
        "lowering": lowering,
        "merge_impl": merge_impl,
        "family": family,
        "steps": [_step_name(reduction, algo) for reduction in steps],
        **config,
    }
    return model


@dataclass(frozen=True)
class _Merging:
    """What every family's patch takes from `patch_model`'s arguments."""

    algo: str
    ratio: float | None
    merges: list[int] | None
    lowering: str

    def schedule(
        self, num_tokens: int, depth: int, num_prefix: int, merge_layers: Sequence[int] | None = None
    ) -> TokenSchedule:
        return build_schedule(num_tokens, depth, algo=self.algo, ratio=self.ratio, merges=self.merges,
                              num_prefix=num_prefix, merge_layers=merge_layers)  # fmt: skip


_Patched = tuple[TokenSchedule, list, dict]  # the frozen schedule, its layer steps, the family's config


def _patch_timm(model: torch.nn.Module, merging: _Merging, prop_attn: bool, flavor: str | None) -> _Patched:
    timm_vit.check_supported(model)
    num_tokens, num_prefix = timm_vit.token_layout(model)
    token_schedule = merging.schedule(num_tokens, len(model.blocks), num_prefix)
    flavor = flavor or timm_vit.infer_flavor(model)
    steps = vision_layers(merging.algo, token_schedule, flavor, merging.lowering)
    timm_vit.patch(model, steps, prop_attn)
    return token_schedule, steps, {"flavor": flavor}


def _patch_hf_vision(
    model: torch.nn.Module, merging: _Merging, prop_attn: bool, flavor: str | None, image_size: int | None
) -> _Patched:
    image_size = image_size or hf_vision.default_image_size(model)
    hf_vision.check_supported(model, image_size)
    num_tokens, num_prefix = hf_vision.token_layout(model, image_size)
    token_schedule = merging.schedule(num_tokens, hf_vision.depth(model), num_prefix)
    flavor = flavor or hf_vision.flavor_of(model)
    steps = vision_layers(merging.algo, token_schedule, flavor, merging.lowering)
    hf_vision.patch(model, steps, prop_attn, image_size)
    return token_schedule, steps, {"flavor": flavor, "image_size": image_size}


def _patch_text(
    model: torch.nn.Module, merging: _Merging, prop_attn: bool, seq_len: int | None, padding_safe: bool
) -> _Patched:
    if prop_attn:
        raise UnsupportedModelError("proportional attention is not implemented for text models")
    seq_len = seq_len or DEFAULT_TEXT_SEQ_LEN
    num_tokens, num_prefix = hf_text.token_layout(model, seq_len)
    token_schedule = merging.schedule(num_tokens, hf_text.depth(model), num_prefix, merge_layers=hf_text.MERGE_LAYERS)
    steps = text_layers(merging.algo, token_schedule, merging.lowering)
    hf_text.patch(model, steps, padding_safe, seq_len)
    return token_schedule, steps, {"seq_len": seq_len, "padding_safe": padding_safe}


def repatch(model: torch.nn.Module, **changes: object) -> torch.nn.Module:
    """Patch a patched model again with the same settings except `changes` (e.g. `lowering`)."""
    cfg = model.merge_config
    kwargs: dict = {"algo": cfg["algo"], "prop_attn": cfg["prop_attn"], "lowering": cfg["lowering"]}
    if cfg["ratio"] is None:
        kwargs.update(ratio=None, schedule=list(model.token_schedule.merges))
    else:
        kwargs["ratio"] = cfg["ratio"]
    kwargs.update(
        {key: cfg[key] for key in ("seq_len", "image_size", "padding_safe", "flavor", "merge_impl") if key in cfg}
    )
    kwargs.update(changes)
    return patch_model(model, **kwargs)


__all__ = ["TokenSchedule", "patch_model", "repatch", "unpatch_model"]
