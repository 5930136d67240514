"""Registry of short model names and the loader: hub by default, a local checkpoint, or random init.

Each entry is data (where the weights live, what the model is), not an `if name == ...` chain.
Any timm model name or Hugging Face model id not in the registry is accepted too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ops.errors import PitomeError


class ModelLoadError(PitomeError):
    """The model could not be loaded as asked (unknown name, unreadable or mismatched weights)."""


@dataclass(frozen=True)
class ModelSpec:
    """A short name: its source (timm name or HF id), modality, and fixed text length."""

    name: str
    source: str
    kind: str  # "vision" (timm) or "text" (Hugging Face)
    seq_len: int | None = None
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    depth: int | None = None  # known without building the model (for `schedule`)
    num_tokens: int | None = None  # non-prefix tokens
    num_prefix: int = 1
    dim: int | None = None
    mlp_ratio: float = 4.0


REGISTRY = {
    spec.name: spec
    for spec in (
        ModelSpec("deit_tiny", "deit_tiny_patch16_224", "vision", depth=12, num_tokens=196, dim=192),
        ModelSpec("deit_small", "deit_small_patch16_224", "vision", depth=12, num_tokens=196, dim=384),
        ModelSpec("deit_base", "deit_base_patch16_224", "vision", depth=12, num_tokens=196, dim=768),
        ModelSpec(
            "deit_base_distilled", "deit_base_distilled_patch16_224", "vision",
            depth=12, num_tokens=196, num_prefix=2, dim=768,
        ),
        ModelSpec("vit_base", "vit_base_patch16_224.augreg_in21k_ft_in1k", "vision", depth=12, num_tokens=196, dim=768),
        ModelSpec(
            "mae_base", "vit_base_patch16_224.mae", "vision",
            timm_kwargs=(("global_pool", "avg"), ("num_classes", 1000)),
            depth=12, num_tokens=196, dim=768,
        ),
        ModelSpec("bert_base", "bert-base-uncased", "text", seq_len=128, depth=12, num_tokens=127, dim=768),
        ModelSpec(
            "distilbert_base", "distilbert-base-uncased", "text", seq_len=128, depth=6, num_tokens=127, dim=768
        ),
    )
}  # fmt: skip


def resolve(name: str) -> ModelSpec:
    """A registry entry, or an ad-hoc spec for any timm model name or HF model id."""
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if timm.is_model(name) or timm.is_model(name.split(".")[0]):
        return ModelSpec(name, name, "vision")
    if "/" in name or Path(name).is_dir():
        return ModelSpec(name, name, "text", seq_len=128)
    raise ModelLoadError(
        f"unknown model {name!r}: use one of {', '.join(REGISTRY)}, a timm model name, or a Hugging Face id"
    )


def load_model(
    spec: ModelSpec, checkpoint: str | None = None, random_init: bool = False
) -> tuple[torch.nn.Module, str]:
    """Load `spec` and say where its weights came from ("pretrained", "checkpoint PATH", "random-init")."""
    if checkpoint is not None and not Path(checkpoint).exists():
        raise ModelLoadError(f"checkpoint not found: {checkpoint}")
    loader = _load_timm if spec.kind == "vision" else _load_hf
    model = loader(spec, checkpoint, random_init)
    origin = "random-init" if random_init else f"checkpoint {checkpoint}" if checkpoint else "pretrained"
    return model.eval(), origin


def _load_timm(spec: ModelSpec, checkpoint: str | None, random_init: bool) -> torch.nn.Module:
    import timm

    kwargs = dict(spec.timm_kwargs)
    try:
        model = timm.create_model(spec.source, pretrained=not (random_init or checkpoint), **kwargs)
    except Exception as exc:  # hub errors come in many types; all mean the same to the user
        raise ModelLoadError(
            f"could not load pretrained weights for {spec.source} ({type(exc).__name__}); "
            "pass --checkpoint PATH for local weights or --random-init"
        ) from None
    if checkpoint:
        try:
            state = _read_state_dict(checkpoint)
            model.load_state_dict(state)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"checkpoint {checkpoint} does not fit {spec.source}: {first}") from None
    return model


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch file (bare, or under 'model'/'state_dict')."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError("not a state dict")
    return state


def _load_hf(spec: ModelSpec, checkpoint: str | None, random_init: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, BertConfig, DistilBertConfig

    source = checkpoint or spec.source
    if random_init:
        defaults = {"bert_base": BertConfig, "distilbert_base": DistilBertConfig}
        if spec.name in defaults:
            config = defaults[spec.name]()  # the defaults are the base-uncased architectures
        else:
            config = _hf_call(AutoConfig.from_pretrained, source)
        return AutoModelForSequenceClassification.from_config(config)
    config = _hf_call(AutoConfig.from_pretrained, source)
    archs = config.architectures or []
    auto = AutoModelForSequenceClassification if any("SequenceClassification" in a for a in archs) else AutoModel
    return _hf_call(auto.from_pretrained, source)


def _hf_call(fn, source: str):
    try:
        return fn(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if os.path.isdir(source) else "; pass --checkpoint FOLDER for a local model or --random-init"
        raise ModelLoadError(f"could not load {source}: {first}{hint}") from None
