"""`pitome-export finetune`: win back what merging costs by distillation, then export the result.

The stages, in order: check (every input, before anything is written), prepare (the teacher as
loaded, unmerged and frozen; the student patched by the export job's own patch stage, so it is
exactly what the export traces; the training split of `--data` and its validation slice), train
(the shared loop, `pipelines.learning.loop`: data-parallel under `accelerate launch`/`torchrun`,
checkpointed into `DIR.partial/` and resumed by the same command), then on the main process the
output folder, published whole: the fine-tuned weights in the model's own format,
finetune.json, training.png, and the export job's stages run on the fine-tuned model, whose
accuracy stage scores the test split of `--data` against the unmerged original.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.errors import PitomeError
from pipelines.jobs import options
from pipelines.jobs.export_job import ExportJob
from pipelines.jobs.finetune.recipes import VALIDATION_MAX, defaults_text
from pipelines.jobs.options import option

if TYPE_CHECKING:
    import torch

    from pipelines.jobs.finetune.data import Sources, TrainingSplits
    from pipelines.jobs.finetune.recipes import Recipe
    from pipelines.models.registry import ModelSpec

FINETUNE = ("finetune",)  # the command that declares the options below


@dataclass
class FinetuneJob(ExportJob):
    """What `pitome-export finetune` was asked for; the export fields apply to the fine-tuned model.
    Recipe fields left None take the model family's value (`recipes.RECIPES`)."""

    data: str | None = option(
        "--data", group="training", commands=FINETUNE,
        help="training data, of which only the training split is read: fashion-mnist, rotten-tomatoes, an IDX "
        "folder, a folder with train/ and test/ (or val/) class folders or train.csv and test.csv, a class folder or "
        "a .csv/.jsonl file (text,label); its test split then scores the export",
    )  # fmt: skip
    from_tune: str | None = option(
        "--from-tune", group="merging", exclusive=True, metavar="DIR", commands=FINETUNE,
        help="the algorithm, proportional attention and schedule of a `pitome-export tune` result folder",
    )  # fmt: skip
    pick: int | None = option(
        "--pick", group="merging", type=options.positive_int, metavar="N", commands=FINETUNE,
        help="with --from-tune: the N-th point of its Pareto front, fastest first (default: the tune's choice)",
    )  # fmt: skip
    epochs: int | None = option("--epochs", group="training", type=options.positive_int, commands=FINETUNE,
                                help=f"training epochs ({defaults_text('epochs')})")  # fmt: skip
    lr: float | None = option("--lr", group="training", type=options.positive_float, commands=FINETUNE,
                              help=f"AdamW learning rate, cosine decay to 0 ({defaults_text('lr')})")  # fmt: skip
    batch_size: int | None = option(
        "--batch-size", group="training", type=options.positive_int, commands=FINETUNE,
        help=f"global batch, all processes together ({defaults_text('batch_size')})",
    )  # fmt: skip
    temperature: float | None = option(
        "--temperature", group="training", type=options.positive_float, metavar="T", commands=FINETUNE,
        help=f"distillation temperature: T^2 x KL(teacher || student) on logits at T ({defaults_text('temperature')})",
    )  # fmt: skip
    label_weight: float | None = option(
        "--label-weight", group="training", type=options.non_negative, metavar="W", commands=FINETUNE,
        help=f"weight of the cross-entropy on labels ({defaults_text('label_weight')})",
    )  # fmt: skip
    embedding_weight: float | None = option(
        "--embedding-weight", group="training", type=options.non_negative, metavar="W", commands=FINETUNE,
        help="weight of 1 - cosine between the student's and the teacher's embeddings, the classifier head's input "
        f"(models without a head distil their pooled output alone) ({defaults_text('embedding_weight')})",
    )  # fmt: skip
    freeze: list[str] | None = option(
        "--freeze", group="training", type=options.name_list, metavar="NAMES", commands=FINETUNE,
        help="parameters left as they are: names or fnmatch patterns, comma-separated, or none "
        f"({defaults_text('freeze')})",
    )  # fmt: skip
    keep_epochs: bool = option(
        "--keep-epochs", default=False, group="training", action="store_true", commands=FINETUNE,
        help="also keep every epoch's weights (epochs/epoch-N.safetensors, the merged student's state dict): "
        "`python -m benchmarks.finetune_curve DIR` scores them on the test split after training",
    )  # fmt: skip
    publish_epoch: str = option(
        "--publish-epoch", default="last", group="training", choices=("last", "best"), commands=FINETUNE,
        help="whose weights are published and exported: the last epoch's, where the cosine decay ends (default), "
        f"or the epoch's with the best validation figure; the slice is small (at most {VALIDATION_MAX:,} samples), so "
        "its best epoch is often not the test split's best (docs/finetune.md)",
    )  # fmt: skip
    seed: int = option(
        "--seed", default=0, group="training", type=options.seed, commands=FINETUNE,
        help="seeds the validation slice, the data order, augmentation and dropout: the same seed gives the same "
        "run, another seed another run of the same recipe, to see how far two runs differ (default 0)",
    )  # fmt: skip
    export: bool = option("--no-export", default=True, group="training", action="store_false", commands=FINETUNE,
                          help="stop after training: the weights, finetune.json and the curve")  # fmt: skip

    def default_out(self) -> Path:
        schedule = "tuned" if self.from_tune else f"r{self.ratio:g}" if self.schedule is None else "sched"
        return Path("artifacts") / f"{self.model}-{self.algo}-{schedule}-finetune"

    def recipe(self, kind: str) -> Recipe:
        """The family's recipe with the fields this job sets in place of its own."""
        from pipelines.jobs.finetune.recipes import recipe_for

        fields = ("epochs", "lr", "batch_size", "temperature", "label_weight", "embedding_weight")
        changed = {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
        if self.freeze is not None:
            changed["freeze"] = tuple(self.freeze)
        return dataclasses.replace(recipe_for(kind), **changed)


@dataclass
class Setup:
    """What training needs, made by `prepare` before anything is written."""

    spec: ModelSpec
    recipe: Recipe
    teacher: torch.nn.Module
    origin: str  # where the teacher's weights came from
    student: torch.nn.Module  # patched with the job's frozen schedule
    signature: Any
    seq_len: int | None
    sources: Sources
    splits: TrainingSplits
    frozen: list[str]
    schedule: dict  # merges, algo, ratio, prop_attn: what the student was patched with
    schedule_source: str  # how the schedule was chosen (report)


def with_tuned_schedule(job: FinetuneJob) -> tuple[FinetuneJob, str]:
    """The job with `--from-tune`'s schedule in place of its ratio, and how the schedule was chosen."""
    from pipelines.jobs.finetune.from_tune import tuned_schedule

    if job.pick is not None and job.from_tune is None:
        raise PitomeError("--pick N chooses a point of a tune result: use it with --from-tune DIR")
    if job.from_tune is None:
        how = f"--schedule {','.join(map(str, job.schedule))}" if job.schedule else f"--ratio {job.ratio:g}"
        return job, how
    tuned = tuned_schedule(job.from_tune, job.pick)
    return dataclasses.replace(job, algo=tuned.algo, prop_attn=tuned.prop_attn, schedule=tuned.merges), tuned.label


def check_finetune_job(job: FinetuneJob) -> ModelSpec:
    """Every check that needs no model (one line, exit 2; a missing backend exit 4); the model's spec."""
    from pipelines.jobs.export_job import check_algo_fits, check_merge_impl, check_precision_flags, check_target
    from pipelines.models.registry import resolve

    if job.data is None:
        raise PitomeError(
            "finetune needs training data: pass --data (fashion-mnist, rotten-tomatoes, a folder, a file)"
        )
    if job.export:
        check_target(job.target)
        check_merge_impl(job.lowering)
        check_precision_flags(job)
    spec = resolve(job.model)
    check_algo_fits(job.algo, spec)
    recipe = job.recipe(spec.kind)
    if recipe.epochs < 1 or recipe.lr <= 0 or recipe.batch_size < 1 or recipe.temperature <= 0:
        raise PitomeError("epochs, learning rate, batch size and temperature must be positive")
    if min(recipe.label_weight, recipe.embedding_weight) < 0:
        raise PitomeError("loss weights must be >= 0")
    return spec


def prepare(job: FinetuneJob, spec: ModelSpec, schedule_source: str, console) -> Setup:
    """Load the teacher, patch the student, open the training split and carve its validation slice."""
    from pipelines.jobs.finetune.data import carve_validation, sources_of
    from pipelines.jobs.finetune.distill import freeze
    from pipelines.jobs.stages import JobContext, open_data, patch
    from pipelines.models.registry import load_model

    sources = sources_of(job.data, spec.kind)
    teacher, origin = load_model(spec, job.checkpoint, job.random_init)
    # the export job's patch stage, on a copy: the same schedule and merge the export traces, trained
    # with the decomposed merge (the fused lowerings export the same computation)
    training = dataclasses.replace(job, data=None, lowering=job.patch_lowering, precision="fp32")
    ctx = JobContext(training, spec, Path(), Path(), console, model=copy.deepcopy(teacher))
    patch(ctx)
    with_train = dataclasses.replace(job, data=sources.train)
    data = open_data(with_train, spec, ctx.model, ctx.seq_len, ctx.signature, split=sources.idx_split)
    splits = carve_validation(data, job.seed)
    recipe = job.recipe(spec.kind)
    frozen = freeze(ctx.model, recipe.freeze)
    config = ctx.model.merge_config
    schedule = {
        "merges": list(ctx.model.token_schedule.merges),
        **{k: config[k] for k in ("algo", "ratio", "prop_attn")},
    }
    return Setup(spec, recipe, teacher, origin, ctx.model, ctx.signature, ctx.seq_len, sources, splits, frozen,
                 schedule, schedule_source)  # fmt: skip


def partial_folder(final: Path) -> Path:
    """Where an unfinished run keeps its checkpoint: beside the output folder, found again by the same command."""
    return final.with_name(f"{final.name}.partial")


def run_finetune(job: FinetuneJob, console) -> Path | None:
    """Train, then (main process) publish the folder; return it (None on the other processes)."""
    from pipelines.jobs.export_job import claim_output
    from pipelines.jobs.stages import torch_settings

    job, schedule_source = with_tuned_schedule(job)
    spec = check_finetune_job(job)
    final = claim_output(job)  # refuses an existing folder before any training
    if job.random_init:
        console.print("[yellow]RANDOM-INIT WEIGHTS: the teacher is random; the training and export still run.[/]")
    with torch_settings(job.threads, job.seed):
        setup = prepare(job, spec, schedule_source, console)
        trained = train(setup, job, partial_folder(final) / "checkpoint.pt", console)
        if trained is None:  # not the main process: it trained its shard, the main process writes
            return None
        folder, summary = publish(setup, job, trained, console)
    shutil.rmtree(partial_folder(final), ignore_errors=True)
    finish(summary, spec, folder, job, console)
    return folder


@dataclass
class Trained:
    """The main process's result of training: the loop's record and the figures around it."""

    result: Any  # pipelines.learning.loop.LoopResult
    before: dict[str, float]  # the student on the validation slice before training
    teacher: dict[str, float]  # the teacher on the validation slice
    processes: int
    device: str
    epoch_files: list[Path]  # with --keep-epochs: each epoch's weights, in epoch order (else empty)


def train(setup: Setup, job: FinetuneJob, checkpoint: Path, console) -> Trained | None:
    """Distil the student on the training split through the shared loop; None off the main process."""
    from exporter.runners import device_name
    from pipelines.jobs.finetune.data import training_samples
    from pipelines.jobs.finetune.distill import Distillation, LossWeights
    from pipelines.jobs.finetune.recipes import CHECKPOINT_SECONDS
    from pipelines.learning.loop import LoopSettings, epoch_file, make_accelerator
    from pipelines.learning.loop import train as run_loop

    recipe = setup.recipe
    accelerator = make_accelerator(cpu=job.device == "cpu")
    weights = LossWeights(recipe.temperature, recipe.label_weight, recipe.embedding_weight)
    task = Distillation(setup.student, setup.teacher, setup.signature, weights, setup.splits.validation,
                        accelerator.device)  # fmt: skip
    setup.student.to(accelerator.device)
    before, teacher = task.evaluate(setup.student), task.evaluate(setup.teacher)
    settings = LoopSettings(
        epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=recipe.weight_decay,
        seed=job.seed, checkpoint_seconds=CHECKPOINT_SECONDS, max_grad_norm=recipe.max_grad_norm, select=task.select,
        publish=job.publish_epoch, keep_epochs=job.keep_epochs,
    )  # fmt: skip
    samples = training_samples(setup.splits.train, recipe.augment and setup.spec.kind != "text", job.seed)
    try:
        result = run_loop(
            setup.student, task, samples, settings, checkpoint, identity(setup, job), accelerator, console
        )
    finally:
        task.release()
    if not accelerator.is_main_process:
        return None
    kept = [epoch_file(checkpoint, entry["epoch"]) for entry in result.state.history] if job.keep_epochs else []
    return Trained(result, before, teacher, accelerator.num_processes, device_name(accelerator.device), kept)


def identity(setup: Setup, job: FinetuneJob) -> dict:
    """What a checkpoint must have been made by to be resumed: model and weights, schedule, data, recipe,
    whether every epoch is kept (a run that kept some epochs and not others would be refused by
    the curve harness, so the flag cannot change mid-run) and which epoch is published (a run that
    switched to the best epoch midway would not hold the best weights of the epochs before)."""
    from pipelines.jobs.tune.job import weights_digest

    return {
        "model": setup.spec.name, "weights": weights_digest(setup.teacher), "merge": setup.student.merge_config,
        "schedule": setup.schedule["merges"], "data": setup.splits.train.description,
        "train_samples": len(setup.splits.train), "validation_samples": len(setup.splits.validation),
        "recipe": dataclasses.asdict(setup.recipe), "seed": job.seed, "keep_epochs": job.keep_epochs,
        "publish_epoch": job.publish_epoch, "version": 2,
    }  # fmt: skip


def publish(setup: Setup, job: FinetuneJob, trained: Trained, console) -> tuple[Path, dict | None]:
    """The output folder, written whole: weights, finetune.json, training.png, then the export."""
    from pipelines.jobs.export_job import build_output_folder
    from pipelines.jobs.finetune import outputs

    def build(out: Path) -> dict | None:
        model = outputs.fine_tuned_model(setup.student, trained.result.weights)
        record = outputs.write_training_files(setup, job, trained, model, out)
        summary = (
            export_fine_tuned(setup, job, model, outputs.origin_line(record), out, console) if job.export else None
        )
        outputs.write_report_section(record, out)
        return summary

    return build_output_folder(job, build)


def export_job_of(job: FinetuneJob, test_source: str | None) -> ExportJob:
    """The export job of the fine-tuned model: the user's export flags, `--data` its test split."""
    values = {f.name: getattr(job, f.name) for f in dataclasses.fields(ExportJob) if f.init}
    return ExportJob(**{**values, "data": test_source})


def export_fine_tuned(setup: Setup, job: FinetuneJob, model, origin: str, out: Path, console) -> dict:
    """The export job's stages on the fine-tuned model into `out`; the unmerged graph they time and
    score it against is the original's (the teacher), not the fine-tuned weights unmerged."""
    import tempfile

    from exporter.variants import Variant, export_variant
    from pipelines.jobs.stages import run_stages

    export = export_job_of(job, setup.sources.test)
    if setup.sources.test is None:
        console.print(f"[yellow]{job.data} has no test split: the export has no accuracy stage[/]")
    with tempfile.TemporaryDirectory(prefix="pitome-finetune-") as scratch:
        preset: dict[str, Any] = {"model": model, "origin": origin}
        if export.bench or export.data:
            preset["baseline"], _ = export_variant(
                setup.teacher.cpu(), Variant("unmerged original"), Path(scratch), seq_len=setup.seq_len,
                opset=job.opset, dynamic_batch=not job.static_batch,
            )  # fmt: skip
        return run_stages(export, setup.spec, out, console, **preset)


def finish(summary: dict | None, spec: ModelSpec, folder: Path, job: FinetuneJob, console) -> None:
    """The closing lines; a failed export check is exit 3 with the folder kept, as the export job does."""
    from pipelines.jobs.export_job import raise_on_failure
    from pipelines.jobs.report import print_summary

    if summary is None:
        console.print(f"[bold]Fine-tuned weights:[/] {folder}  (--no-export: run the export with --checkpoint)")
        return
    print_summary(summary, spec, folder, console)
    raise_on_failure(summary, job.precision, folder)
