"""Registry of short model names and the loader: hub by default, a local checkpoint, or random init.

Each entry is data (where the weights live, what the model is), not an `if name == ...` chain.
Any timm model name or Hugging Face model id not in the registry is accepted too.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
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
    kind: str  # "vision" (timm), "hf_vision" or "text" (Hugging Face)
    seq_len: int | None = None
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    depth: int | None = None  # known without building the model (for `schedule`)
    num_tokens: int | None = None  # non-prefix tokens
    num_prefix: int = 1
    dim: int | None = None
    mlp_ratio: float = 4.0
    builder: str | None = None  # "module:function(checkpoint, random_init)" for models this project ships
    data: str | None = None  # the labelled data the model was trained for (`--data` accepts the name)
    text_family: str | None = None  # "bert" or "distilbert" (`ops.patch.hf_text`) where known before loading


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
        ModelSpec("vit_base_hf", "google/vit-base-patch16-224", "hf_vision", depth=12, num_tokens=196, dim=768),
        ModelSpec("clip_b16", "openai/clip-vit-base-patch16", "hf_vision", depth=12, num_tokens=196, dim=768),
        ModelSpec(  # the 224 crop of its image processor (the config's 518 is the pre-training size)
            "dinov2_small", "facebook/dinov2-small", "hf_vision", depth=12, num_tokens=256, dim=384
        ),
        ModelSpec(
            "bert_base", "bert-base-uncased", "text", seq_len=128, depth=12, num_tokens=127, dim=768, text_family="bert"
        ),
        ModelSpec(
            "distilbert_base", "distilbert-base-uncased", "text", seq_len=128, depth=6, num_tokens=127, dim=768,
            text_family="distilbert",
        ),
        ModelSpec(
            "vit_fmnist", "pitome-export vit_fmnist (trained here)", "vision",
            depth=12, num_tokens=49, dim=96, builder="pipelines.models.vit_fmnist:build", data="fashion-mnist",
        ),
        ModelSpec(
            "minilm_sentiment", "sentence-transformers/all-MiniLM-L6-v2 + head trained here", "text",
            seq_len=64, depth=6, num_tokens=63, dim=384, builder="pipelines.models.sentence_classifier:build",
            data="rotten-tomatoes", text_family="bert",
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
        kind = hf_kind(name)
        return ModelSpec(name, name, kind, seq_len=128 if kind == "text" else None)
    raise ModelLoadError(
        f"unknown model {name!r}: use one of {', '.join(REGISTRY)}, a timm model name, or a Hugging Face id"
    )


def load_model(
    spec: ModelSpec, checkpoint: str | None = None, random_init: bool = False
) -> tuple[torch.nn.Module, str]:
    """Load `spec` and say where its weights came from: "pretrained" (the hub), "shipped (card: PATH)"
    (the weights this project ships), "checkpoint PATH" or "random-init"."""
    if checkpoint is not None and not Path(checkpoint).exists():
        raise ModelLoadError(f"checkpoint not found: {checkpoint}")
    if spec.builder is not None:
        import importlib

        module, function = spec.builder.split(":")
        model = getattr(importlib.import_module(module), function)(checkpoint, random_init)
    else:
        loaders = {"vision": _load_timm, "hf_vision": _load_hf_vision, "text": _load_hf}
        model = loaders[spec.kind](spec, checkpoint, random_init)
    if random_init:
        origin = "random-init"
    elif checkpoint:
        origin = f"checkpoint {checkpoint}"
    elif spec.builder is not None:
        origin = f"shipped (card: pipelines/models/assets/{spec.name}/card.md)"
    else:
        origin = "pretrained"
    return model.eval(), origin


def _load_timm(spec: ModelSpec, checkpoint: str | None, random_init: bool) -> torch.nn.Module:
    import timm

    kwargs = dict(spec.timm_kwargs)
    pretrained = not (random_init or checkpoint)
    try:
        with offline_if_hub_unreachable() if pretrained else contextlib.nullcontext(False) as offline:
            model = timm.create_model(spec.source, pretrained=pretrained, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean the same to the user
        reason = "the model hub is unreachable and the weights are not cached" if offline else type(exc).__name__
        raise ModelLoadError(
            f"could not load pretrained weights for {spec.source} ({reason}); "
            "pass --checkpoint PATH for local weights or --random-init"
        ) from None
    if checkpoint:
        load_weights(model, checkpoint, spec.source)
    return model


def load_weights(module: torch.nn.Module, path: str, what: str) -> None:
    """Load a weights file into `module`; unreadable or mismatched files are one ModelLoadError line."""
    try:
        state = read_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and zip each raise their own types
        raise ModelLoadError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"checkpoint {path} does not fit {what}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hub_resolves(timeout: float = 3.0) -> bool:
    """Whether the model hub's host resolves (`HF_ENDPOINT`, default huggingface.co)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def offline_if_hub_unreachable(timeout: float = 3.0) -> Iterator[bool]:
    """Inside the block, the hub clients read their cache only when the hub's host does not resolve.

    Without this, every file is retried with back-off for about half a minute before failing.
    Yields whether the block runs offline; the environment and the hub client's setting are
    restored after it, so a later load in the same process asks the hub again.
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1" or hub_resolves(timeout):
        yield os.environ.get("HF_HUB_OFFLINE") == "1"
        return
    import huggingface_hub.constants as hub

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield True
    finally:
        hub.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
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
    with contextlib.nullcontext() if os.path.isdir(source) else offline_if_hub_unreachable():
        config = _hf_call(AutoConfig.from_pretrained, source)
        archs = config.architectures or []
        auto = AutoModelForSequenceClassification if any("SequenceClassification" in a for a in archs) else AutoModel
        return _hf_call(auto.from_pretrained, source)


def _hf_call(fn, source: str):
    try:
        return fn(source)
    except (OSError, ValueError) as exc:
        first = _first_line(exc)
        hint = "" if os.path.isdir(source) else "; pass --checkpoint FOLDER for a local model or --random-init"
        raise ModelLoadError(f"could not load {source}: {first}{hint}") from None


def tokenizer_source(model: torch.nn.Module, spec: ModelSpec, checkpoint: str | None = None) -> str:
    """Where the text model's tokenizer loads from: the folder its weights came from, else the hub id."""
    loaded_from = getattr(getattr(model, "config", None), "name_or_path", "")
    return loaded_from or checkpoint or spec.source


TEXT_MODEL_TYPES = ("bert", "distilbert")


def read_hf_config(source: str) -> dict:
    """The config.json of a model folder, or of a hub id (from the hub or its cache), as a dict."""
    path = Path(source) / "config.json"
    if not Path(source).is_dir():
        from huggingface_hub import hf_hub_download

        try:
            with offline_if_hub_unreachable():
                path = Path(hf_hub_download(source, "config.json"))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean the same to the user
            raise ModelLoadError(
                f"could not read the config of {source} ({type(exc).__name__}); "
                "pass --checkpoint FOLDER for a local model or --random-init"
            ) from None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source} has no readable config.json: {_first_line(exc)}") from None


def hf_kind(source: str) -> str:
    """ "text" or "hf_vision", read from the model's config.json (`model_type`); a family that
    merging would compute wrong, or that no patch knows, is refused with the reason."""
    from ops.patch.hf_vision import MODEL_TYPES, REFUSED_MODEL_TYPES

    model_type = read_hf_config(source).get("model_type")
    if model_type in REFUSED_MODEL_TYPES:
        raise ModelLoadError(f"{source}: {model_type} models are not supported: {REFUSED_MODEL_TYPES[model_type]}")
    if model_type in TEXT_MODEL_TYPES:
        return "text"
    if model_type in MODEL_TYPES:
        return "hf_vision"
    raise ModelLoadError(
        f"{source}: model_type {model_type!r} is not supported; supported Hugging Face types: "
        f"{', '.join(TEXT_MODEL_TYPES + MODEL_TYPES)}"
    )


# Registry names' architectures, for --random-init without a config folder (offline).
HF_VISION_CONFIGS = {
    "vit_base_hf": ("ViTConfig", {"num_labels": 1000, "architectures": ["ViTForImageClassification"]}),
    "clip_b16": ("CLIPVisionConfig", {"patch_size": 16, "projection_dim": 512}),
    # at the 224 crop its published image processor feeds it (the checkpoint's positions cover 518)
    "dinov2_small": ("Dinov2Config", {"hidden_size": 384, "num_attention_heads": 6, "image_size": 224}),
}


def _hf_vision_class(config):
    """The transformers class to build: the classifier when the config names one, CLIP's image
    tower with its projection for a CLIP model (image_embeds), else the bare encoder."""
    import transformers

    archs = config.architectures or []
    if config.model_type in ("clip", "clip_vision_model") and "CLIPVisionModel" not in archs:
        return transformers.CLIPVisionModelWithProjection
    if any("ForImageClassification" in a for a in archs):
        return transformers.AutoModelForImageClassification
    return transformers.AutoModel


def _load_hf_vision(spec: ModelSpec, checkpoint: str | None, random_init: bool) -> torch.nn.Module:
    import transformers

    source = checkpoint or spec.source
    if random_init and spec.name in HF_VISION_CONFIGS and checkpoint is None:
        name, values = HF_VISION_CONFIGS[spec.name]
        config = getattr(transformers, name)(**values)
    else:
        with contextlib.nullcontext() if os.path.isdir(source) else offline_if_hub_unreachable():
            config = _hf_call(transformers.AutoConfig.from_pretrained, source)
            if config.model_type == "clip":  # the image tower of a full CLIP checkpoint
                config = config.vision_config
            if not random_init:
                return _hf_call(_hf_vision_class(config).from_pretrained, source)
    model_class = _hf_vision_class(config)
    # Auto classes build through from_config; a concrete class (CLIP's tower) through its constructor
    return model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
