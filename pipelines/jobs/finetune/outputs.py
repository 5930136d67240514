"""What the fine-tuning job writes beside the export: the weights in the model's own format,
finetune.json (recipe, per-epoch figures, time, device, versions), training.png, and its section
of report.md."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from exporter.atomic import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from pipelines.jobs.finetune.job import FinetuneJob, Setup, Trained

TIMM_WEIGHTS = "model.safetensors"  # timm models: a state dict, what `--checkpoint FILE` loads
HF_WEIGHTS = "weights"  # Hugging Face models: a save_pretrained folder, what `--checkpoint FOLDER` loads
EPOCHS = "epochs"  # --keep-epochs: each epoch's state dict of the merged student


def fine_tuned_model(student: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The student with the published epoch's weights, unpatched: the stock model, on the CPU."""
    from ops import unpatch_model

    student.load_state_dict(weights)
    return unpatch_model(student).cpu().eval()


def save_weights(model: torch.nn.Module, setup: Setup, job: FinetuneJob, out: Path) -> str:
    """Write the weights as the model's loader reads them; return their path inside `out`."""
    if setup.spec.kind == "vision":
        from safetensors.torch import save

        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write(out / TIMM_WEIGHTS, lambda tmp: Path(tmp).write_bytes(save(weights)))
        return TIMM_WEIGHTS
    folder = out / HF_WEIGHTS
    save_hf_folder(model, folder)
    if setup.spec.kind == "text":
        from transformers import AutoTokenizer

        from pipelines.models.registry import tokenizer_source

        AutoTokenizer.from_pretrained(tokenizer_source(setup.teacher, setup.spec, job.checkpoint)).save_pretrained(
            folder
        )
    else:
        from pipelines.models.image_processor import FILE, job_processor

        processor = job_processor(setup.teacher, setup.spec, job.checkpoint, job.random_init)
        atomic_write_text(folder / FILE, json.dumps(processor, indent=2))
    return HF_WEIGHTS


def save_hf_folder(model: torch.nn.Module, folder: Path) -> None:
    """`save_pretrained`, or for `minilm_sentiment` (a frozen-encoder classifier of our own) its
    encoder's `save_pretrained` and its head beside it, as `sentence_classifier.build` loads them."""
    from pipelines.models.sentence_classifier import HEAD_FILE, SentenceClassifier

    if not isinstance(model, SentenceClassifier):
        model.save_pretrained(folder)
        return
    from safetensors.torch import save

    model.bert.save_pretrained(folder)
    head = {k: v.detach().contiguous() for k, v in model.classifier.state_dict().items()}
    atomic_write(folder / HEAD_FILE, lambda tmp: Path(tmp).write_bytes(save(head)))


def training_record(setup: Setup, job: FinetuneJob, trained: Trained, weights: str) -> dict:
    """finetune.json: how the model was trained, on what, where, and how each epoch went."""
    from importlib import metadata

    from exporter.onnx_export import package_versions
    from exporter.runners import cpu_name
    from pipelines.jobs.report import git_commit

    state = trained.result.state
    trainable = sum(p.numel() for p in setup.student.parameters() if p.requires_grad)
    return {
        "command_line": shlex.join(job.command_line),
        "git_commit": git_commit(),
        "versions": {
            **package_versions(),
            "accelerate": metadata.version("accelerate"),
            "python": platform.python_version(),
        },  # fmt: skip
        "cpu": cpu_name(),
        "device": trained.device,
        "processes": trained.processes,
        "threads": job.threads,
        "seed": job.seed,
        "teacher_weights": setup.origin,
        "schedule": {"source": setup.schedule_source, **setup.schedule},
        "recipe": {
            **dataclasses.asdict(setup.recipe),
            "optimizer": "AdamW, cosine decay to 0 per step",
            "frozen_parameters": setup.frozen,
            "trainable_parameters": trainable,
        },  # fmt: skip
        "data": {
            "train": setup.splits.train.description,
            "train_samples": len(setup.splits.train),
            "validation": setup.splits.validation.description,
            "validation_samples": len(setup.splits.validation),
            "test": setup.sources.test,
        },  # fmt: skip
        "validation_before": trained.before,
        "validation_teacher": trained.teacher,
        "history": state.history,
        "curve": state.curve,
        "publish_epoch": job.publish_epoch,  # how the published epoch was chosen: "last" or "best"
        "published_epoch": trained.result.epoch,
        "best_epoch": state.best_epoch,  # the best on the validation slice, published or not
        "best_value": state.best_value,
        "wall_seconds": state.wall_seconds,
        "samples_per_second": state.samples / max(1e-9, state.step_seconds),
        "weights": weights,
        "epoch_weights": [f"{EPOCHS}/{path.name}" for path in trained.epoch_files],
    }


def write_training_files(setup: Setup, job: FinetuneJob, trained: Trained, model: torch.nn.Module, out: Path) -> dict:
    """The weights, finetune.json and training.png in `out`; the record written."""
    record = training_record(setup, job, trained, save_weights(model, setup, job, out))
    if trained.epoch_files:
        (out / EPOCHS).mkdir()
        for path in trained.epoch_files:
            link_or_copy(path, out / EPOCHS / path.name)
    atomic_write_text(out / "finetune.json", json.dumps(record, indent=2, default=str))
    draw_curve(record, out / "training.png")
    return record


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no second copy on disk), else a copy. The
    source stays: the checkpoint folder must survive a failed export."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def origin_line(record: dict) -> str:
    """Where the exported weights came from, for the export report's first line."""
    epochs = len(record["history"])
    return (f"fine-tuned {epochs} epoch{'s' if epochs != 1 else ''} on {record['data']['train']} from "
            f"{record['teacher_weights']} ({record['weights']}, finetune.json); {published_text(record)}")  # fmt: skip


def publish_rule(record: dict) -> str:
    """How a finetune.json's run chose the epoch it published, "last" or "best"; records written
    before `--publish-epoch` existed published the validation slice's best."""
    return record.get("publish_epoch", "best")


def published_epoch(record: dict) -> int:
    """The epoch whose weights a finetune.json's run published (older records: see `publish_rule`)."""
    return record.get("published_epoch", record["best_epoch"])


def published_text(record: dict) -> str:
    """Which epoch's weights were published, and why."""
    if publish_rule(record) == "best":
        return f"epoch {published_epoch(record)} published, the best on the validation slice"
    return f"the last epoch published (the validation slice's best: epoch {record['best_epoch']})"


def _figure(record: dict) -> str:
    """The validation figure that is quoted: accuracy for a classifier, cosine for a feature model."""
    return "val_accuracy" if "val_accuracy" in record["validation_teacher"] else "val_cosine"


def draw_curve(record: dict, path: Path) -> None:
    """Training loss per logging window, and the validation figure per epoch against the teacher's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = _figure(record)
    fig, loss_axis = plt.subplots(figsize=(7, 4.5))
    curve = record["curve"]
    loss_axis.plot([p["epoch"] for p in curve], [p["loss"] for p in curve], c="C0", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="C0")
    value_axis = loss_axis.twinx()
    epochs = [0] + [h["epoch"] for h in record["history"]]
    values = [record["validation_before"][figure]] + [h[figure] for h in record["history"]]
    value_axis.plot(epochs, [100 * v for v in values], "o-", c="C1", label=f"student {figure}")
    value_axis.axhline(100 * record["validation_teacher"][figure], c="C2", ls="--", label="unmerged teacher")
    value_axis.set_ylabel(f"{figure} (%)", color="C1")
    value_axis.legend(loc="lower right", fontsize=8)
    loss_axis.set_title(f"fine-tuning: {record['schedule']['algo']} {','.join(map(str, record['schedule']['merges']))}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def training_markdown(record: dict) -> str:
    """report.md's fine-tuning section: recipe, data, and one row per epoch."""
    figure = _figure(record)
    recipe, data = record["recipe"], record["data"]
    lines = [
        "## Fine-tuning", "",
        f"- schedule: {record['schedule']['source']}; weights {record['weights']} (load with `--checkpoint`)",
        f"- loss: {recipe['temperature']:g}^2 x KL at T={recipe['temperature']:g} + {recipe['label_weight']:g} x "
        f"cross-entropy + {recipe['embedding_weight']:g} x embedding cosine distance; AdamW lr {recipe['lr']:g}, "
        f"weight decay {recipe['weight_decay']:g}, batch {recipe['batch_size']}, {recipe['epochs']} epochs, "
        f"augmentation {'shifts and flips' if recipe['augment'] else 'none'}, frozen: "
        f"{', '.join(recipe['frozen_parameters']) or 'nothing'}",
        f"- data: {data['train']}; scored each epoch on the {data['validation']}; the test split "
        f"({data['test'] or 'none'}) was not seen in training",
        f"- weights: {published_text(record)}",
        f"- {record['processes']} process(es) on {record['device']}, {record['wall_seconds'] / 60:.1f} minutes, "
        f"{record['samples_per_second']:.0f} samples/s",
        "",
        f"| epoch | training loss | {figure} | wall minutes |",
        "|---:|---:|---:|---:|",
        f"| before | | {100 * record['validation_before'][figure]:.2f}% | |",
        *(f"| {h['epoch']}{' (published)' if h['epoch'] == record['published_epoch'] else ''} | "
          f"{h['train_loss']:.4f} | {100 * h[figure]:.2f}% | {h['wall_seconds'] / 60:.1f} |" for h in record["history"]),
        f"| unmerged teacher | | {100 * record['validation_teacher'][figure]:.2f}% | |",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def write_report_section(record: dict, out: Path) -> None:
    """Append the fine-tuning section to the export's report.md (or start one under --no-export)."""
    report = out / "report.md"
    head = report.read_text() + "\n" if report.exists() else "# pitome-export finetune\n\n"
    atomic_write_text(report, head + training_markdown(record))
