"""Train `vit_fmnist`: a small timm ViT on Fashion-MNIST, on the CPU, seeded and resumable.

    python -m pipelines.training.train_vit_fmnist --epochs 30 --out checkpoints/vit_fmnist

The model is trained by this project (it is not a published checkpoint). Every epoch ends with
a checkpoint (`last.pt`: model, optimizer, step, random state) and a test-set evaluation in
`history.json`; running the command again resumes after the last finished epoch. When the
last epoch is done, `model.safetensors` and `card.md` (data, recipe, seed, wall time, CPU,
accuracy) are written beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exporter.atomic import atomic_write, atomic_write_text
from pipelines.data.labelled import FASHION_MNIST_DIR, read_idx
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
    """Random shifts of up to 2 pixels and horizontal flips, per image."""
    background = (0.0 - MEAN) / STD
    padded = F.pad(x, (2, 2, 2, 2), value=background)
    shifts = torch.randint(0, 5, (x.shape[0], 2), generator=gen)
    out = torch.stack([padded[i, :, dy : dy + 28, dx : dx + 28] for i, (dy, dx) in enumerate(shifts.tolist())])
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def learning_rate(step: int, steps_per_epoch: int, total_steps: int, base: float = 1e-3) -> float:
    warmup = steps_per_epoch
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def train(args: argparse.Namespace, console) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.data)
    train_x, train_y = load_split(root, "train", args.limit)
    test_x, test_y = load_split(root, "test", args.limit)
    torch.manual_seed(args.seed)
    model = architecture(drop_path=RECIPE["drop_path"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    history: list[dict] = []
    start_epoch, wall = 0, 0.0
    checkpoint = out / "last.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # drop path draws from the global generator
        start_epoch, history, wall = state["epoch"], state["history"], state["wall_seconds"]
        console.print(f"resuming after epoch {start_epoch} (test accuracy {history[-1]['test_accuracy']:.2%})")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        for epoch in range(start_epoch, args.epochs):
            began = time.perf_counter()
            task = progress.add_task(f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch, stats="")
            model.train()
            order = torch.randperm(len(train_x), generator=gen)
            seen = correct = 0
            loss_sum = 0.0
            for i in range(steps_per_epoch):
                idx = order[i * args.batch_size : (i + 1) * args.batch_size]
                x, y = augment(train_x[idx], gen), train_y[idx]
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(epoch * steps_per_epoch + i, steps_per_epoch, total_steps)
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=RECIPE["label_smoothing"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(y)
                correct += int((logits.argmax(-1) == y).sum())
                loss_sum += float(loss.detach()) * len(y)
                progress.update(task, advance=1, stats=f"loss {loss_sum / seen:.4f} acc {correct / seen:.2%}")
            test_accuracy = evaluate(model, test_x, test_y)
            wall += time.perf_counter() - began
            history.append(
                {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                 "test_accuracy": test_accuracy, "wall_seconds": wall}
            )  # fmt: skip
            progress.update(task, stats=f"loss {loss_sum / seen:.4f} acc {correct / seen:.2%} test {test_accuracy:.2%}")
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "epoch": epoch + 1, "history": history, "wall_seconds": wall,
            }  # fmt: skip
            atomic_write(checkpoint, lambda tmp, state=state: torch.save(state, tmp))
            atomic_write_text(out / "history.json", json.dumps(history, indent=2))
    if history and history[-1]["epoch"] == args.epochs:
        _finish(model, history, args, out)
    return {"history": history}


def _median_epoch_minutes(history: list[dict]) -> float:
    """The typical epoch's wall time: the median gap between consecutive epochs' clocks."""
    clocks = [0.0] + [entry["wall_seconds"] for entry in history]
    return statistics.median(b - a for a, b in zip(clocks, clocks[1:], strict=False)) / 60


def _finish(model: torch.nn.Module, history: list[dict], args: argparse.Namespace, out: Path) -> None:
    from safetensors.torch import save_file

    from exporter.runners import cpu_name

    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(weights, tmp))
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
