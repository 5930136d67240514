"""What the fine-tuning loop optimises: the merged student distilled from the unmerged teacher.

Loss per batch: T^2 x KL(teacher || student) of the logits at temperature T, plus `label_weight`
x cross-entropy on the labels, plus `embedding_weight` x (1 - cosine) between the embeddings the
two models make: the classifier head's input (found by a hook on the head), or for a model
without a head its pooled output (`pooler_output`, `image_embeds`), which is then the whole loss.
After each epoch the student is scored on the validation slice: top-1 and agreement with the
teacher for a classifier, mean embedding cosine for a feature model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exporter.signatures import ExportWrapper, ModelSignature, as_outputs
from ops.errors import UnsupportedModelError
from pipelines.data.labelled import LabelledData
from pipelines.jobs.finetune.data import batches

POOLED_OUTPUTS = ("image_embeds", "pooler_output")
EVAL_BATCH = 256


@dataclass(frozen=True)
class LossWeights:
    """The loss's terms (see the module docstring)."""

    temperature: float
    label_weight: float
    embedding_weight: float


def head_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The classifier head whose input is the model's embedding: timm's `get_classifier()`, a
    Hugging Face (or `SentenceClassifier`) `classifier`; None for a feature model."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return getattr(model, "classifier", None)


def freeze(model: torch.nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Stop training the parameters whose names match a pattern (fnmatch; a bare name also covers
    its children: "classifier" freezes "classifier.weight"); return the frozen names. A pattern
    that matches nothing is refused: a typo would otherwise train what the user meant to keep."""
    frozen = []
    for pattern in patterns:
        matched = [name for name, _ in model.named_parameters()
                   if fnmatch.fnmatchcase(name, pattern) or name.startswith(f"{pattern}.")]  # fmt: skip
        if not matched:
            raise UnsupportedModelError(f"--freeze {pattern} matches no parameter of the model")
        frozen += matched
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return sorted(set(frozen))


class EmbeddingTap:
    """Records what goes into a module (the head) on each call: the embedding of the last forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        self.value = args[0]

    def remove(self) -> None:
        """Take the hook off the module (before the model is saved or exported)."""
        self.handle.remove()


class Distillation:
    """The loop's `TrainingTask`: the student (the loop's model, patched) against `teacher`."""

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        signature: ModelSignature,
        weights: LossWeights,
        validation: LabelledData,
        device: torch.device,
    ) -> None:
        self.signature, self.weights, self.validation, self.device = signature, weights, validation, device
        self.classifier = "logits" in signature.output_names
        pooled = [name for name in POOLED_OUTPUTS if name in signature.output_names]
        if not self.classifier and not pooled:
            raise UnsupportedModelError(
                f"{type(student).__name__} has neither logits nor a pooled output ({', '.join(POOLED_OUTPUTS)}) "
                "to distil"
            )
        self.output = "logits" if self.classifier else pooled[0]
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        wants_taps = self.classifier and weights.embedding_weight > 0
        self.taps = (EmbeddingTap(head_of(student)), EmbeddingTap(head_of(teacher))) if wants_taps else None
        self._teacher_predictions: torch.Tensor | None = None

    def _output(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distilled output (`logits`, else the pooled one) of `model` on `inputs`."""
        outputs = as_outputs(ExportWrapper(model, self.signature)(*(inputs[n] for n in self.signature.input_names)))
        return outputs[self.signature.output_names.index(self.output)]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss and its terms (batch means)."""
        inputs = {name: batch[name].to(self.device) for name in self.signature.input_names}
        with torch.no_grad():
            target = self._output(self.teacher, inputs)
            target_embedding = self.taps[1].value if self.taps else None
        output = self._output(model, inputs)
        if not self.classifier:
            cosine = 1.0 - F.cosine_similarity(output, target, dim=-1).mean()
            return cosine, {"cosine_distance": float(cosine.detach())}
        w = self.weights
        t = w.temperature
        kl = F.kl_div(
            F.log_softmax(output / t, -1), F.log_softmax(target / t, -1), reduction="batchmean", log_target=True
        )
        terms = {"kl": kl * t * t}
        if w.label_weight > 0:
            terms["cross_entropy"] = F.cross_entropy(output, batch["labels"].to(self.device))
        if self.taps is not None:
            terms["embedding"] = 1.0 - F.cosine_similarity(self.taps[0].value, target_embedding, dim=-1).mean()
        weight = {"kl": 1.0, "cross_entropy": w.label_weight, "embedding": w.embedding_weight}
        total = sum(weight[name] * value for name, value in terms.items())
        return total, {name: float(value.detach()) for name, value in terms.items()}

    def _predictions(self, model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(output, labels) of `model` over the validation slice, batch by batch."""
        for inputs, labels in batches(self.validation, EVAL_BATCH):
            yield self._output(model, {k: v.to(self.device) for k, v in inputs.items()}), labels.to(self.device)

    @torch.no_grad()
    def outputs(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """`model`'s outputs on the validation slice (in eval mode) and the slice's labels."""
        was_training = model.training
        model.eval()
        outputs, labels = zip(*self._predictions(model))
        model.train(was_training)
        return torch.cat(outputs), torch.cat(labels)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The student on the validation slice: `val_accuracy` and `val_agreement` (with the
        teacher) for a classifier, `val_cosine` (with the teacher) for a feature model."""
        output, label = self.outputs(model)
        reference = self.teacher_outputs()
        if not self.classifier:
            return {"val_cosine": float(F.cosine_similarity(output, reference, dim=-1).mean())}
        predicted = output.argmax(-1)
        return {"val_accuracy": float((predicted == label).float().mean()),
                "val_agreement": float((predicted == reference.argmax(-1)).float().mean())}  # fmt: skip

    @torch.no_grad()
    def teacher_outputs(self) -> torch.Tensor:
        """The teacher's outputs on the validation slice (computed once)."""
        if self._teacher_predictions is None:
            self._teacher_predictions = torch.cat([out for out, _ in self._predictions(self.teacher)])
        return self._teacher_predictions

    def release(self) -> None:
        """Take the embedding hooks off both models: training is over."""
        for tap in self.taps or ():
            tap.remove()

    @property
    def select(self) -> str:
        """The validation figure that picks the best epoch (higher is better)."""
        return "val_accuracy" if self.classifier else "val_cosine"
