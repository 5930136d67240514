"""The training loop of this project: the shipped models' training scripts and `pitome-export
finetune` both run it.

One process on the CPU or one GPU, or data-parallel under `accelerate launch` or `torchrun`:
Accelerate prepares the model (DistributedDataParallel), the optimizer and the data loader, whose
every global batch of `batch_size` samples it splits between the processes, so the batches and
the averaged gradients are those of one process (up to float rounding and dropout draws).

Seeded and resumable: epoch `e` reads the samples in a permutation seeded by (seed, e), and
samples are augmented with generators of their own (`pipelines.learning.samples`). A checkpoint
(one file, written by the main process: model, optimizer, scheduler, the loop's counters and every
process's random state) is written at the end of every epoch, every `checkpoint_seconds`, and at
Ctrl-C once the step in progress has finished; the same run started again continues from it
with the result an uninterrupted run gives. A loss that is not finite stops the run before its
step is applied (`TrainingDivergedError`, exit 3), the last checkpoint left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from exporter.atomic import atomic_write, atomic_write_text
from exporter.errors import ParityError
from ops.errors import PitomeError
from pipelines.learning.samples import Samples, already_batched

LOG_WINDOWS_PER_EPOCH = 20  # points of the training-loss curve per epoch


class TrainingDivergedError(ParityError):
    """The loss stopped being finite: the run ends (exit 3) and keeps its last good checkpoint."""


class CheckpointMismatchError(PitomeError):
    """A checkpoint exists for another recipe (or other data, or another model): not resumed."""


@dataclass(frozen=True)
class LoopSettings:
    """How the loop trains. `batch_size` is the global batch, all processes together."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then cosine decay to 0 over the remaining steps
    seed: int = 0
    checkpoint_seconds: float = 300.0
    max_grad_norm: float | None = None
    select: str | None = None  # the `evaluate` figure (higher is better) that ranks epochs (best_epoch, best_value)
    publish: str = "last"  # whose weights the run returns: the "last" epoch's, or the "best" by `select`
    keep_epochs: bool = False  # also keep each epoch's weights (`epoch-N.safetensors` beside the checkpoint)


class TrainingTask(Protocol):
    """What the loop trains for."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's mean loss, and figures to log (batch means; "loss" is logged anyway)."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Figures of the model after an epoch; every process calls it and gets the same figures."""


@dataclass
class LoopState:
    """The loop's counters; saved in every checkpoint. Sums are over all processes."""

    epoch: int = 0  # finished epochs
    step: int = 0  # finished steps of the epoch in progress
    history: list[dict] = field(default_factory=list)  # one entry per finished epoch
    curve: list[dict] = field(default_factory=list)  # training loss per logging window
    sums: dict[str, float] = field(default_factory=dict)  # the epoch in progress: figure -> sum over samples
    window: dict[str, float] = field(default_factory=dict)  # the logging window in progress
    wall_seconds: float = 0.0  # training and evaluation, across resumptions
    step_seconds: float = 0.0  # in training steps only (samples/s)
    samples: int = 0  # training samples processed, all processes
    best_epoch: int | None = None
    best_value: float | None = None


@dataclass
class LoopResult:
    """The finished run: its counters and the weights of the epoch `LoopSettings.publish` chose."""

    state: LoopState
    weights: dict[str, torch.Tensor] | None  # the main process only; None elsewhere
    epoch: int  # whose weights they are (1-based)


class SeededOrder(torch.utils.data.Sampler):
    """Sample indices in a permutation seeded by (seed, epoch): every process draws the same one."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())


def warmup_cosine(warmup: int, total: int):
    """The learning-rate factor of step `s`: linear warm-up over `warmup` steps, then cosine to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def make_accelerator(cpu: bool):
    """The Accelerator of this process: plain on one process; under `accelerate launch` or
    `torchrun`, data-parallel (gloo on CPUs). Global batches are split between the processes."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(cpu=cpu, rng_types=[], dataloader_config=DataLoaderConfiguration(split_batches=True))


def epoch_file(checkpoint: Path, epoch: int) -> Path:
    """Where `LoopSettings.keep_epochs` keeps epoch `epoch`'s weights (1-based): beside the checkpoint."""
    return checkpoint.with_name(f"epoch-{epoch}.safetensors")


def epoch_of_file(path: str | Path) -> int | None:
    """The epoch of a file `epoch_file` names (`epoch-N.safetensors` -> N); None for any other name."""
    match = re.fullmatch(r"epoch-(\d+)\.safetensors", Path(path).name)
    return int(match.group(1)) if match else None


def steps_per_epoch(samples: int, batch_size: int) -> int:
    """Whole global batches of an epoch (the remainder waits for another epoch's permutation)."""
    return samples // batch_size


def rng_state() -> dict:
    """This process's random states (Python, NumPy, PyTorch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequests:
    """Ctrl-C (SIGINT) and SIGTERM while training: recorded, so that the step in progress ends, a
    checkpoint is written and the loop then raises KeyboardInterrupt. A second signal raises at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        from pipelines.jobs import interrupts

        interrupts.INTERRUPTED.set()
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequests]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class Loop:
    """One run of the loop: `model` trained on `samples` for `task`, checkpointed to `checkpoint`."""

    model: torch.nn.Module
    task: TrainingTask
    samples: Samples
    settings: LoopSettings
    checkpoint: Path
    identity: dict  # what the checkpoint must have been made by to be resumed (recipe, data, weights)
    accelerator: Any
    console: Any = None
    state: LoopState = field(default_factory=LoopState)

    def __post_init__(self) -> None:
        s = self.settings
        self.steps = steps_per_epoch(len(self.samples), s.batch_size)
        self.total_steps = self.steps * s.epochs
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(s.warmup_steps, self.total_steps)
        )
        self.order = SeededOrder(len(self.samples), s.seed)
        batches = torch.utils.data.BatchSampler(self.order, s.batch_size, drop_last=True)
        loader = torch.utils.data.DataLoader(self.samples, batch_sampler=batches, collate_fn=already_batched)
        self.best_weights: dict[str, torch.Tensor] | None = None  # publish="best": the best epoch's so far
        self._resume()
        self.model, self.optimizer, self.loader = self.accelerator.prepare(self.model, self.optimizer, loader)
        if self._saved is not None:
            self.optimizer.load_state_dict(self._saved["optimizer"])
            self.scheduler.load_state_dict(self._saved["scheduler"])
        self._saved = None  # the loaded checkpoint is not kept in memory

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def _resume(self) -> None:
        """Load the checkpoint of this identity (the model before it is prepared)."""
        self._saved = None
        if not self.checkpoint.is_file():
            return
        saved = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        if saved["identity"] != self.identity:
            differ = sorted(k for k in {*saved["identity"], *self.identity}
                            if saved["identity"].get(k) != self.identity.get(k))  # fmt: skip
            raise CheckpointMismatchError(
                f"{self.checkpoint} was made by another run ({', '.join(differ)} differ): delete it to start over"
            )
        self.model.load_state_dict(saved["model"])
        self.best_weights = saved["best_weights"]
        self.state = LoopState(**saved["state"])
        states = saved["rng"]
        index = self.accelerator.process_index
        if len(states) != self.accelerator.num_processes and self.main:
            self._print(f"[yellow]the checkpoint was written by {len(states)} processes, this run has "
                        f"{self.accelerator.num_processes}: dropout draws differ from an uninterrupted run[/]")  # fmt: skip
        set_rng_state(states[index % len(states)])
        self._saved = saved
        done = self.state.epoch * self.steps + self.state.step
        self._print(f"resuming from {self.checkpoint}: epoch {self.state.epoch + 1}, step {done} of {self.total_steps}")

    def _print(self, text: str) -> None:
        if self.console is not None and self.main:
            self.console.print(text)

    def save(self) -> None:
        """Write the checkpoint (every process calls this; the main process writes it)."""
        from accelerate.utils import gather_object

        states = gather_object([rng_state()])
        if self.main:
            record = {
                "identity": self.identity, "model": self.accelerator.unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "state": asdict(self.state), "rng": states, "best_weights": self.best_weights,
            }  # fmt: skip
            atomic_write(self.checkpoint, lambda tmp: torch.save(record, tmp))
        self.accelerator.wait_for_everyone()

    def run(self) -> LoopResult:
        """Train the epochs left, then return the result (the published weights on the main process)."""
        with self._progress() as progress, StopRequests().installed() as stops:
            for epoch in range(self.state.epoch, self.settings.epochs):
                self._epoch(epoch, progress, stops)
        if self.settings.publish == "best":
            return LoopResult(self.state, self.best_weights if self.main else None, self.state.best_epoch)
        return LoopResult(self.state, self._weights() if self.main else None, self.state.epoch)

    def _weights(self) -> dict[str, torch.Tensor]:
        unwrapped = self.accelerator.unwrap_model(self.model)
        return {k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()}

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Any]:
        """A live bar on the main process: epoch, step, loss, samples/s, elapsed and ETA."""
        if self.console is None or not self.main:
            yield None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
        with Progress(*columns, console=self.console) as progress:
            done = self.state.epoch * self.steps + self.state.step
            progress.add_task("train", total=self.total_steps, completed=done, stats="")
            yield progress

    def _epoch(self, epoch: int, progress, stops: StopRequests) -> None:
        self.order.set_epoch(epoch)
        self.samples.set_epoch(epoch)
        loader = self.accelerator.skip_first_batches(self.loader, self.state.step) if self.state.step else self.loader
        # an Accelerate loader sets its sampler's epoch to how often it was iterated: a resumed run's
        # loaders (the one skipping the finished steps, then the whole one) would count from 0
        loader.set_epoch(epoch)
        self.model.train()
        last_save = time.monotonic()
        for batch in loader:
            began = time.perf_counter()
            due = self.main and time.monotonic() - last_save > self.settings.checkpoint_seconds
            stop = self._step(batch, stops, due)
            self.state.step_seconds += time.perf_counter() - began
            self.state.wall_seconds += time.perf_counter() - began
            self._show(progress, epoch)
            if stop or due or self._agreed_due:
                self.save()
                last_save = time.monotonic()
            if stop:
                self._print(f"[yellow]interrupted: checkpoint written to {self.checkpoint}; run the same command "
                            "again to resume[/]")  # fmt: skip
                raise KeyboardInterrupt
        self._finish_epoch(epoch)

    def _step(self, batch: dict[str, torch.Tensor], stops: StopRequests, due: bool) -> bool:
        """One optimizer step; whether the processes agreed to stop after it. The processes agree on
        a non-finite loss (no step is taken), a stop request (one made while the loss was computed
        counts) and a checkpoint due, in one reduction that also sums the step's figures."""
        loss, figures = self.task.loss(self.model, batch)
        figures = {"loss": float(loss.detach()), **figures}
        n = float(next(iter(batch.values())).shape[0])
        names = sorted(figures)
        local = [float(not math.isfinite(figures["loss"])), float(stops.requested), float(due), n]
        local += [figures[name] * n if math.isfinite(figures[name]) else 0.0 for name in names]
        agreed = self.accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=self.accelerator.device))
        agreed = agreed.tolist()
        if agreed[0] > 0:
            raise TrainingDivergedError(
                f"the loss is not finite at epoch {self.state.epoch + 1}, step {self.state.step + 1}: stopped; the last "
                f"good checkpoint is {self.checkpoint if self.checkpoint.is_file() else 'none (no checkpoint yet)'}"
                " (a lower --lr may help)"
            )
        self.accelerator.backward(loss)
        if self.settings.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count(dict(zip(["samples", *names], agreed[3:])))
        self._agreed_due = agreed[2] > 0
        return agreed[1] > 0

    def _count(self, sums: dict[str, float]) -> None:
        """Add a step's sums to the epoch and the logging window; close the window when it is full."""
        state = self.state
        state.step += 1
        state.samples += int(sums["samples"])
        for bucket in (state.sums, state.window):
            for name, value in sums.items():
                bucket[name] = bucket.get(name, 0.0) + value
        window_steps = max(1, self.steps // LOG_WINDOWS_PER_EPOCH)
        if state.step % window_steps == 0 or state.step == self.steps:
            count = state.window.pop("samples")
            state.curve.append({"epoch": state.epoch + state.step / self.steps,
                                **{k: v / count for k, v in state.window.items()}})  # fmt: skip
            state.window = {}

    def _show(self, progress, epoch: int) -> None:
        if progress is None:
            return
        state = self.state
        loss = state.sums.get("loss", 0.0) / max(1.0, state.sums.get("samples", 1.0))
        rate = state.samples / max(1e-9, state.step_seconds)
        progress.update(
            progress.task_ids[0], advance=1, description=f"epoch {epoch + 1}/{self.settings.epochs}",
            stats=f"step {state.step}/{self.steps} · loss {loss:.4f} · {rate:.0f} samples/s",
        )  # fmt: skip

    def _rank_epoch(self, epoch: int, figures: dict[str, float]) -> bool:
        """Record the epoch as the best so far when its `select` figure is; whether it was."""
        state, select = self.state, self.settings.select
        if select is None or (state.best_value is not None and figures[select] <= state.best_value):
            return False
        state.best_epoch, state.best_value = epoch + 1, figures[select]
        return True

    def _finish_epoch(self, epoch: int) -> None:
        """Evaluate, record and rank the epoch, keep its weights where asked (one copy serves the held
        best and the epoch file), checkpoint."""
        began = time.perf_counter()
        figures = self.task.evaluate(self.accelerator.unwrap_model(self.model))
        self.model.train()
        state = self.state
        count = state.sums.pop("samples", 0.0) or 1.0
        state.wall_seconds += time.perf_counter() - began
        entry = {"epoch": epoch + 1, **{f"train_{k}": v / count for k, v in state.sums.items()}, **figures,
                 "wall_seconds": state.wall_seconds, "samples_per_second": state.samples / max(1e-9, state.step_seconds)}  # fmt: skip
        state.history.append(entry)
        state.epoch, state.step, state.sums = epoch + 1, 0, {}
        hold = self._rank_epoch(epoch, figures) and self.settings.publish == "best"
        weights = self._weights() if self.main and (hold or self.settings.keep_epochs) else None
        if hold:
            self.best_weights = weights
        if self.settings.keep_epochs and self.main:
            from safetensors.torch import save_file

            atomic_write(epoch_file(self.checkpoint, epoch + 1),
                         lambda t: save_file({k: v.contiguous() for k, v in weights.items()}, t))  # fmt: skip
        if self.main:
            atomic_write_text(self.checkpoint.with_name("history.json"), json.dumps(state.history, indent=2))
        self._print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch"))
        self.save()


def train(
    model: torch.nn.Module,
    task: TrainingTask,
    samples: Samples,
    settings: LoopSettings,
    checkpoint: Path,
    identity: dict,
    accelerator,
    console=None,
) -> LoopResult:
    """Train `model` (its parameters that require grad) for `task` on `samples`; resume from
    `checkpoint` when it holds a run of `identity` (refused when it holds another's)."""
    if settings.epochs < 1 or settings.lr <= 0 or settings.batch_size < 1:
        raise PitomeError("epochs, learning rate and batch size must be positive")
    if settings.batch_size % accelerator.num_processes:
        raise PitomeError(f"the batch of {settings.batch_size} does not split into {accelerator.num_processes} "
                          "processes: pass a multiple of the process count")  # fmt: skip
    if settings.publish not in ("last", "best") or (settings.publish == "best" and settings.select is None):
        raise PitomeError(f"publish={settings.publish!r}: the last epoch, or the best by a `select` figure")
    if steps_per_epoch(len(samples), settings.batch_size) < 1:
        raise PitomeError(f"{len(samples)} training samples make no batch of {settings.batch_size}")
    loop = Loop(model, task, samples, settings, checkpoint, copy.deepcopy(identity), accelerator, console)
    return loop.run()
