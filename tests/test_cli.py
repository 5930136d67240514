"""The command line as users run it: exit codes, one-line errors, complete or absent output folders.

`cli` calls `pipelines.cli.commands.main(argv)` in this process (tests.cli_helpers); `cli_process` starts a real
interpreter, kept where the process is what is tested: `--help`/`--version` and a missing backend
failing fast (before any heavy import), Ctrl-C, and one end-to-end job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import ROOT, cli, cli_process, one_line_error


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A timm test_vit checkpoint made here (random weights, but loaded as a user's local file)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "test_vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    return path


def test_help_and_version_are_fast():
    start = time.perf_counter()
    assert cli_process("--help").returncode == 0
    version = cli_process("--version")
    assert version.returncode == 0 and "pitome-export" in version.stdout
    assert time.perf_counter() - start < 5
    help_text = cli_process("export", "--help").stdout
    for group in ("model", "merging", "export", "validation", "benchmark", "output", "exit codes"):
        assert group in help_text


def test_schedule_subcommand_prints_table():
    result = cli("schedule", "deit_small", "--ratio", "0.9")
    assert result.returncode == 0, result.stderr
    assert "schedule: 19,17,16,14,13,11,10,9,8,7,7,6" in result.stdout
    assert "1.79x fewer" in result.stdout
    text = cli("schedule", "bert_base", "--schedule", "30,20,10")  # one entry per merging layer, as tune prints
    assert text.returncode == 0, text.stderr
    assert "schedule: 30,20,10,0,0,0,0,0,0,0,0,0" in text.stdout


def test_env_subcommand():
    result = cli("env")
    assert result.returncode == 0 and "onnxruntime" in result.stdout and "tensorrt" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["deit_small", "--ratio", "1.5"], "ratio must be a number in (0, 1], got 1.5"),
        (["deit_small", "--ratio", "abc"], "ratio must be a number"),
        (["deit_small", "--random-init", "--ratio", "0.4"], "PiToMe needs ratio >= 0.5"),
        (["deit_small", "--random-init", "--schedule", "1,2,3"], "3 entries but the model has 12 layers"),
        (["deit_small", "--random-init", "--schedule", "99,0,0,0,0,0,0,0,0,0,0,0"], "at most half"),
        (["deit_small", "--schedule", "1,x"], "comma-separated integers"),
        (["no_such_model_xyz", "--random-init"], "unknown model 'no_such_model_xyz'"),
        (["deit_small", "--checkpoint", "/nonexistent/w.pth"], "checkpoint not found"),
        (["schedule", "deit_small", "--ratio", "0.3"], "PiToMe needs ratio >= 0.5"),
        (["inspect", "/nonexistent/model.onnx"], "no such ONNX file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    one_line_error(
        cli(*args, "-o", str(tmp_path / "out")) if args[0] not in ("schedule", "inspect") else cli(*args), 2, fragment
    )
    assert not (tmp_path / "out").exists()


def test_unreadable_onnx_is_exit_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    one_line_error(cli("inspect", str(bad)), 2, "not a readable ONNX model")


def test_mismatched_checkpoint_is_exit_2(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    one_line_error(cli("test_vit", "--checkpoint", str(path), "-o", str(tmp_path / "o")), 2, "does not fit test_vit")
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint_is_exit_2(tmp_path):
    for name in ("w.safetensors", "w.pth"):
        (tmp_path / name).write_bytes(os.urandom(200))
        one_line_error(
            cli("test_vit", "--checkpoint", str(tmp_path / name), "-o", str(tmp_path / "o")),
            2,
            "cannot read checkpoint",
        )


def test_unreachable_hub_fails_fast_with_a_hint(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HOME when it is imported: in this process, point its cache there directly
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.perf_counter()
    result = cli("test_vit", "-o", str(tmp_path / "o"), HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"))
    one_line_error(result, 2, "--checkpoint PATH for local weights or --random-init")
    assert "unreachable" in result.stderr and time.perf_counter() - start < 30


def test_trt_without_tensorrt_fails_fast_with_exit_4(tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    start = time.perf_counter()  # a whole process: the check comes before torch is imported
    result = cli_process("deit_base", "--ratio", "0.9", "--target", "trt", "-o", str(tmp_path / "o"))
    assert time.perf_counter() - start < 5
    one_line_error(result, 4, "TensorRT not installed (pip install pitome-export[trt])")


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(cli("deit_small", "--random-init", "-o", str(out)), 2, "exists; pass --force")
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_output_is_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(cli("deit_small", "--random-init", "-o", str(blocker / "sub" / "out")), 2, "cannot write")


def test_full_job_writes_complete_folder(tmp_path, checkpoint):
    """The one end-to-end job in a real process, as a user runs it."""
    out = tmp_path / "art"
    result = cli_process("test_vit", "--checkpoint", str(checkpoint), "--algo", "tome", "--ratio", "0.9",
                 "--batch", "2", "--runs", "3", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench.json", "data_config.json", "model.onnx", "parity.json", "report.md", "schedule.json"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["context"]["weights"] == f"checkpoint {checkpoint}"
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["latency"]) == {
        "onnxruntime merged",
        "onnxruntime unmerged",
        "pytorch eager merged",
        "pytorch eager unmerged",
    }
    assert bench["block_flop_speedup"] > 1.0
    report = (out / "report.md").read_text()
    assert report.startswith("# pitome-export report: test_vit") and "PASSED" in report
    assert "schedule r = 10,9,8,7,6,6" in result.stdout
    assert "pitome-export summary" in result.stdout and "PASSED vs PyTorch on cpu" in result.stdout
    assert json.loads((out / "data_config.json").read_text())["input_size"] == [3, 160, 160]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp folder left beside it
    inspected = cli("inspect", str(out / "model.onnx"))
    assert inspected.returncode == 0 and "TensorRT compatible: yes" in inspected.stdout
    assert "schedule r: 10,9,8,7,6,6" in inspected.stdout


def test_random_init_report_says_so_first(tmp_path):
    out = tmp_path / "art"
    result = cli("test_vit", "--random-init", "--no-bench", "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "report.md").read_text().startswith("> **RANDOM-INIT WEIGHTS**")
    assert result.stdout.startswith("RANDOM-INIT WEIGHTS")
    assert json.loads((out / "parity.json").read_text())["context"]["weights"] == "random-init"
    assert not (out / "bench.json").exists()


def test_parity_failure_exits_3(tmp_path, monkeypatch, checkpoint):
    """A bound no output can meet (atol < 0): exit 3, the folder kept for inspection. Unmerged
    (--ratio 1), so the failure is the outputs' alone and no decision graph is exported."""
    from exporter import parity
    from pipelines.cli import commands as cli_module

    monkeypatch.setitem(parity.TOLERANCES, "fp32", parity.Tolerances(atol=-1.0, rtol=0.0, min_top1=1.0))
    out = tmp_path / "o"
    code = cli_module.main(["test_vit", "--checkpoint", str(checkpoint), "--ratio", "1", "--no-bench", "-o", str(out)])
    assert code == 3
    assert not json.loads((out / "parity.json").read_text())["passed"]


def test_ctrl_c_leaves_nothing_behind(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "test_vit", "--random-init", "-o", str(tmp_path / "o")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".o.") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_sweep_writes_plot_and_table(tmp_path):
    out = tmp_path / "sweep"
    # a ratio list with one algorithm: the algorithm lists are the matched-FLOPs test's
    result = cli("sweep", "test_vit", "--random-init", "--ratios", "0.95,0.9", "--algos", "tome",
                 "--runs", "3", "--batch", "2", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "sweep.json", "tradeoff.png"]
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(p["algo"], p["ratio"]) for p in sweep["points"]] == [("tome", 0.95), ("tome", 0.9)]
    assert all(p["parity_passed"] and 0 <= p["agreement"] <= 1 for p in sweep["points"])
    assert sweep["points"][1]["schedule"] == [10, 9, 8, 7, 6, 6]
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![accuracy vs throughput](tradeoff.png)" in (out / "report.md").read_text()


def test_sweep_at_matched_flops_times_each_point_beside_its_reduction_free_twin(tmp_path):
    """--match-flops puts each algorithm at its own ratio of equal block FLOPs (DCT counts kept
    tokens and reduces after the MLP: 0.88, not 0.9); --reduction-share times twins alongside."""
    out = tmp_path / "sweep"
    result = cli("sweep", "test_vit", "--random-init", "--algos", "pitome,dct", "--match-flops", "pitome@0.9",
                 "--reduction-share", "--runs", "3", "--batch", "2", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [(p["algo"], p["ratio"]) for p in points] == [("pitome", 0.9), ("dct", 0.88)]
    assert abs(points[1]["block_flop_speedup"] / points[0]["block_flop_speedup"] - 1) <= 0.02
    assert all(p["parity_passed"] and -1.0 < p["reduction_share"] < 1.0 for p in points)
    assert "| reduction share |" in (out / "report.md").read_text()


def test_sweep_refuses_a_cost_an_algorithm_cannot_match(tmp_path):
    one_line_error(cli("sweep", "test_vit", "--random-init", "--algos", "pitome", "--match-flops", "dct@0.3",
                       "-o", str(tmp_path / "out")), 2, "pitome cannot match dct@0.3's")  # fmt: skip
    assert not (tmp_path / "out").exists()
    one_line_error(cli("sweep", "test_vit", "--match-flops", "pitome"), 2, "expected ALGO@RATIO")


def test_sweep_random_init_weights_are_the_export_jobs(tmp_path, monkeypatch):
    """The sweep seeds like the export job (--seed, 0 by default): its --random-init weights, and
    so its graphs and figures, are the same in every run and the same as `pitome-export`'s."""
    import torch

    from pipelines.jobs import sweep
    from pipelines.models.registry import load_model, resolve

    heads = []

    def load_only(job, spec, out, console):  # the sweep's first step, then an empty sweep
        heads.append(load_model(spec, job.checkpoint, job.random_init)[0].head.weight.detach().clone())
        return {"points": []}

    monkeypatch.setattr(sweep, "_sweep", load_only)
    for name in ("first", "second"):
        assert cli("sweep", "test_vit", "--random-init", "-o", str(tmp_path / name)).returncode == 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        export_jobs = load_model(resolve("test_vit"), None, True)[0].head.weight
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[0], export_jobs)


def test_sweep_bad_ratio_list(tmp_path):
    one_line_error(cli("sweep", "test_vit", "--ratios", "0.9,2"), 2, "ratio must be a number in (0, 1], got 2")
    one_line_error(cli("sweep", "test_vit", "--algos", "pitome,foo"), 2, "unknown algo 'foo'")


def test_a_swallowed_ctrl_c_still_stops_the_publish(tmp_path):
    """A library's bare `except:` can drop the KeyboardInterrupt; the recorded interrupt still counts."""
    from pipelines.jobs import interrupts
    from pipelines.jobs.export_job import ExportJob, build_output_folder

    def build(folder):
        (folder / "model.onnx").write_text("half")
        try:
            interrupts.INTERRUPTED.set()  # what the SIGINT handler records
            raise KeyboardInterrupt
        except BaseException:  # noqa: BLE001 - the library that swallows it
            pass
        return "done"

    try:
        with pytest.raises(KeyboardInterrupt):
            build_output_folder(ExportJob(model="test_vit", out=str(tmp_path / "o")), build)
    finally:
        interrupts.INTERRUPTED.clear()
    assert list(tmp_path.iterdir()) == []


def test_in_process_cli_reads_like_a_subprocess(monkeypatch):
    """tests.cli_helpers.cli, which most tests here use: the exit code from main's return value or a
    SystemExit, and both streams captured at the file-descriptor level (native libraries' writes too)."""
    from pipelines.cli import commands as cli_module

    def fake_main(argv):
        print("python stdout")
        print("python stderr", file=sys.stderr)
        os.write(1, b"native stdout\n")
        os.write(2, b"native stderr\n")
        if argv == ["usage"]:
            raise SystemExit(2)
        return 3

    monkeypatch.setattr(cli_module, "main", fake_main)
    for argv, code in ((["run"], 3), (["usage"], 2)):
        result = cli(*argv)
        assert result.returncode == code
        assert result.stdout.splitlines() == ["python stdout", "native stdout"]
        assert result.stderr.splitlines() == ["python stderr", "native stderr"]


def test_flag_defaults_are_the_jobs_defaults():
    """Each option is declared once (pipelines.jobs.options): a job from no flags is the job's defaults."""
    from pipelines.cli.commands import build_parser
    from pipelines.jobs.export_job import ExportJob
    from pipelines.jobs.options import job_fields
    from pipelines.jobs.sweep import SweepJob

    for command, job_cls in (("export", ExportJob), ("sweep", SweepJob)):
        args = build_parser().parse_args([command, "test_vit"])
        assert job_cls(**job_fields(args, job_cls, command)) == job_cls(model="test_vit")
    args = build_parser().parse_args(["export", "m", "--schedule", "3,2", "--min-cosine", "0.5", "--max-batch", "9"])
    job = ExportJob(**job_fields(args, ExportJob, "export"))
    assert (job.ratio, job.schedule, job.min_cosine, job.trt_batches) == (None, [3, 2], (0.99, 0.5), (1, 8, 9))


def test_option_choices_are_what_the_library_supports():
    from exporter.quantize import FFN_OUT_PRECISIONS, INT8_MODES, PRECISIONS
    from exporter.runners import ORT_PROVIDERS
    from pipelines.jobs.export_job import ExportJob
    from pipelines.jobs.options import declared

    choices = {f.name: set(opt.choices) for f, opt in declared(ExportJob) if opt.choices is not None}
    assert choices["precision"] == {*PRECISIONS, "bf16"} and choices["int8_mode"] == set(INT8_MODES)
    assert choices["int8_ffn_out"] == set(FFN_OUT_PRECISIONS) and choices["ort_provider"] == set(ORT_PROVIDERS)


def test_a_job_made_in_python_is_held_to_the_flags_choices():
    from ops.errors import PitomeError
    from pipelines.jobs.export_job import ExportJob, check_precision_flags

    with pytest.raises(PitomeError, match="unknown --precision 'int4'; choose one of fp32, fp16, bf16, int8"):
        check_precision_flags(ExportJob(model="test_vit", precision="int4"))


def test_report_lists_the_changed_options_by_group():
    from pipelines.jobs.export_job import ExportJob
    from pipelines.jobs.options import options_by_group

    job = ExportJob(model="m", algo="tome", trt_batches=(1, 4, 8), out="o")
    assert options_by_group(job) == {
        "merging": {"--algo": "tome"}, "tensorrt": {"--min-batch/--opt-batch/--max-batch": [1, 4, 8]},
        "output": {"--out": "o"},
    }  # fmt: skip
    assert options_by_group(job, changed_only=False)["benchmark"]["--batch"] == 8


def test_report_schedule_says_when_nothing_merges():
    """A schedule of zeros (tune's unmerged choice, ratio 1.0) is reported as no merging, not as
    merge settings that do nothing."""
    from pipelines.jobs.report import _schedule_markdown

    config = {"algo": "pitome", "ratio": None, "lowering": "matmul", "prop_attn": False}
    unmerged = _schedule_markdown({"tokens_in": [5, 5], "merges": [0, 0], "tokens_out": [5, 5]},
                                  {**config, "steps": ["none", "none"]})  # fmt: skip
    merged = _schedule_markdown({"tokens_in": [5, 4], "merges": [1, 0], "tokens_out": [4, 4]},
                                {**config, "steps": ["pitome", "none"]})  # fmt: skip
    assert "no token merging" in "\n".join(unmerged) and "algo pitome" not in "\n".join(unmerged)
    assert "algo pitome, ratio None" in "\n".join(merged) and "| 0 | 5 | 1 | 4 | pitome |" in merged


def test_building_the_parser_imports_nothing_heavy():
    code = (
        "import sys; from pipelines.cli.commands import build_parser; build_parser(); "
        "heavy = [m for m in ('torch', 'numpy', 'onnx', 'onnxruntime') if m in sys.modules]; assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_wheel_ships_no_training_scripts_and_the_model_assets():
    """pyproject's package selection: pipelines.training stays in the checkout, the assets ship."""
    import importlib

    import tomllib
    from setuptools import find_packages

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config = pyproject["tool"]["setuptools"]
    found = config["packages"]["find"]
    packages = find_packages(str(ROOT), include=found["include"], exclude=found["exclude"])
    assert "pipelines.models" in packages and "pipelines.cli" in packages
    assert not [p for p in packages if p.startswith("pipelines.training")]
    shipped = [p for glob in config["package-data"]["pipelines.models"] for p in (ROOT / "pipelines/models").glob(glob)]
    assert {p.parent.name for p in shipped} == {"vit_fmnist", "minilm_sentiment"}
    module, _, function = pyproject["project"]["scripts"]["pitome-export"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))  # the console entry point resolves


def test_a_launchers_other_processes_leave_the_console_to_the_main_one(monkeypatch, capsys):
    """Under torchrun or accelerate launch every process runs the CLI; only RANK 0 prints."""
    from pipelines.cli.commands import main

    for rank, prints in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(["schedule", "vit_fmnist", "--ratio", "0.9"]) == 0
        assert bool(capsys.readouterr().out.strip()) is prints
