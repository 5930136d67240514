"""Train `vit_fmnist`: a small timm ViT on Fashion-MNIST, on the CPU, seeded and resumable.

    python -m pipelines.training.train_vit_fmnist --epochs 30 --out checkpoints/vit_fmnist

The model is trained by this project (it is not a published checkpoint), through the project's
one training loop (`pipelines.learning.loop`, which `pitome-export finetune` runs too): a
checkpoint (`last.pt`) at the end of every epoch, every few minutes and at Ctrl-C, and a test-set
evaluation per epoch in `history.json`; running the command again resumes where it stopped
(`--epochs` may be raised: the run goes on under the longer schedule). When the last epoch is
done, `model.safetensors` and `card.md` (data, recipe, seed, wall time, CPU, accuracy) are
written beside them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exporter.atomic import atomic_write, atomic_write_text
from pipelines.data.labelled import FASHION_MNIST_DIR, read_idx
from pipelines.learning.samples import Samples, shift_and_flip
from pipelines.models.vit_fmnist import ARCH, MEAN, STD, architecture

DEFAULT_DATA = FASHION_MNIST_DIR
RECIPE = {
    "optimizer": "AdamW lr 1e-3, weight decay 0.05",
    "schedule": "1 epoch linear warm-up, then cosine to 0 (per step)",
    "batch_size": 128,
    "label_smoothing": 0.1,
    "drop_path": 0.1,
    "augmentation": "random shifts of up to 2 pixels (zero padding) and horizontal flips",
}
LR, WEIGHT_DECAY = 1e-3, 0.05


def load_split(root: Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `[N, 1, 28, 28]` normalised, labels `[N]`, from the IDX files of `split` (train, test)."""
    from pipelines.data.labelled import DataError, find_idx, idx_stems

    files = find_idx(root, split)
    if files is None:
        stems = " and ".join(idx_stems(split))
        raise DataError(f"{root} lacks {stems} (.gz or not): install dataset-fashion-mnist or pass --data DIR")
    images, labels = (read_idx(path)[:limit] for path in files)
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
    return x[:, None], torch.from_numpy(labels.astype(np.int64))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (the edge filled with normalised black) and horizontal flips."""
    return shift_and_flip(x, gen, max_shift=2, background=(0.0 - MEAN) / STD)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


class Classification:
    """The loop's task: cross-entropy with label smoothing; test accuracy after each epoch."""

    def __init__(self, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
        self.test_x, self.test_y = test_x, test_y

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["pixel_values"])
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=RECIPE["label_smoothing"])
        return loss, {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {"test_accuracy": evaluate(model, self.test_x, self.test_y)}


def train(args: argparse.Namespace, console) -> dict:
    """Train (or resume) in `args.out`; the loop's history, and the weights and card once the last epoch is done."""
    from pipelines.learning.loop import LoopSettings, make_accelerator, steps_per_epoch
    from pipelines.learning.loop import train as run_loop

    out = Path(args.out)
    root = Path(args.data)
    train_x, train_y = load_split(root, "train", args.limit)
    test_x, test_y = load_split(root, "test", args.limit)
    torch.manual_seed(args.seed)
    model = architecture(drop_path=RECIPE["drop_path"])
    samples = Samples(lambda i: {"pixel_values": train_x[i], "labels": train_y[i]}, len(train_x), augment,
                      seed=args.seed)  # fmt: skip
    settings = LoopSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=LR, weight_decay=WEIGHT_DECAY, seed=args.seed,
        warmup_steps=steps_per_epoch(len(train_x), args.batch_size),
    )  # fmt: skip
    # the epochs are left out: raising --epochs continues a finished run under the longer schedule
    identity = {"data": str(root.resolve()), "limit": args.limit, "batch_size": args.batch_size, "seed": args.seed,
                "recipe": RECIPE}  # fmt: skip
    result = run_loop(model, Classification(test_x, test_y), samples, settings, out / "last.pt", identity,
                      make_accelerator(cpu=True), console)  # fmt: skip
    history = result.state.history
    if result.weights is not None and history and history[-1]["epoch"] == args.epochs:
        model.load_state_dict(result.weights)
        _finish(model, history, args, out)
    return {"history": history}


def _median_epoch_minutes(history: list[dict]) -> float:
    """The typical epoch's wall time: the median gap between consecutive epochs' clocks."""
    clocks = [0.0] + [entry["wall_seconds"] for entry in history]
    return statistics.median(b - a for a, b in zip(clocks, clocks[1:], strict=False)) / 60


def _finish(model: torch.nn.Module, history: list[dict], args: argparse.Namespace, out: Path) -> None:
    from safetensors.torch import save

    from exporter.runners import cpu_name

    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: Path(tmp).write_bytes(save(weights)))
    final = history[-1]
    card = f"""# vit_fmnist (trained by pitome-export; not a published checkpoint)

A timm `VisionTransformer({", ".join(f"{k}={v}" for k, v in ARCH.items())})`: 49 patches of 4x4
plus a class token, 12 blocks, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters.

- data: Fashion-MNIST (Debian package `dataset-fashion-mnist`), {"all 60,000" if args.limit is None else args.limit}
  training images; test accuracy on {"the 10,000" if args.limit is None else args.limit} test images
- input: `pixel_values [N, 1, 28, 28]`, pixels / 255, normalised with mean {MEAN} and std {STD}
- recipe: {"; ".join(f"{k} {v}" for k, v in RECIPE.items())}; {args.epochs} epochs; seed {args.seed}
- trained on: {cpu_name()}, {args.threads} threads, torch {torch.__version__}, python {platform.python_version()}
- wall time: {final["wall_seconds"] / 60:.1f} minutes in all, across resumptions and including time the CPU was
  shared or paused; the median epoch took {_median_epoch_minutes(history):.1f} minutes
- test accuracy (unmerged): **{final["test_accuracy"]:.2%}**
- command: `python -m pipelines.training.train_vit_fmnist {" ".join(sys.argv[1:])}`
"""
    atomic_write_text(out / "card.md", card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training.train_vit_fmnist", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"folder with the four IDX files (default {DEFAULT_DATA})")
    parser.add_argument("--out", default="checkpoints/vit_fmnist")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke tests)")
    args = parser.parse_args(argv)
    from rich.console import Console

    from ops.errors import PitomeError
    from pipelines.jobs.stages import torch_settings

    try:
        with torch_settings(args.threads):
            train(args, Console())
    except PitomeError as exc:
        print(f"train_vit_fmnist: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
