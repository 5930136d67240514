"""The fine-tuning recipe of each model family, in one place: `--help` quotes it, the job fills
every flag the user left out from it, and finetune.json records the recipe that ran.

Light on purpose (no torch): `pitome-export --help` reads it. The vision recipe is the issue's
probe on `vit_fmnist` (full model, KL at T=2 plus 0.5 x cross-entropy, AdamW 3e-4 with cosine
decay, batch 128, shifts and flips); the text recipe its probe on `minilm_sentiment` (the encoder
distilled on its sentence embedding and logits plus 0.2 x cross-entropy, AdamW 5e-5, batch 32,
the classifier head frozen, so the merged encoder learns to feed the head what it was fitted on).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """How a family is fine-tuned. The loss is T^2 x KL(teacher || student) on logits at
    `temperature`, plus `label_weight` x cross-entropy on the labels, plus `embedding_weight` x
    (1 - cosine) between the student's and the teacher's embeddings (the classifier head's input;
    for a model without a head, its pooled output, which is then the whole loss)."""

    epochs: int
    lr: float
    batch_size: int
    temperature: float
    label_weight: float
    embedding_weight: float
    freeze: tuple[str, ...]  # parameter name patterns (fnmatch; a bare name also matches its children)
    weight_decay: float
    augment: bool  # random shifts and horizontal flips of images
    max_grad_norm: float | None = 1.0


RECIPES = {
    "vision": Recipe(epochs=2, lr=3e-4, batch_size=128, temperature=2.0, label_weight=0.5, embedding_weight=0.0,
                     freeze=(), weight_decay=0.05, augment=True),
    "text": Recipe(epochs=1, lr=5e-5, batch_size=32, temperature=2.0, label_weight=0.2, embedding_weight=1.0,
                   freeze=("classifier",), weight_decay=0.01, augment=False),
}  # fmt: skip
FAMILY = {"vision": "vision", "hf_vision": "vision", "text": "text"}  # ModelSpec.kind -> recipe
VALIDATION_SHARE = 0.05  # of the training split, carved out (seeded, by class) to pick the best epoch
VALIDATION_MAX = 2000  # samples at most
CHECKPOINT_SECONDS = 300.0


def recipe_for(kind: str) -> Recipe:
    """The recipe of a `ModelSpec.kind` ("vision", "hf_vision", "text")."""
    return RECIPES[FAMILY[kind]]


def defaults_text(name: str) -> str:
    """`--help`'s "default: ..." for a recipe field: each family's value."""

    def shown(value) -> str:
        if isinstance(value, tuple):
            return ",".join(value) or "none"
        return f"{value:g}" if isinstance(value, float) else str(value)

    return "default: " + ", ".join(f"{family} {shown(getattr(recipe, name))}" for family, recipe in RECIPES.items())
