"""Run the CLI: in this process through `pipelines.cli.commands.main(argv)` (fast: no interpreter start and
no second import of torch), or as a real subprocess where the process itself is what is tested
(`--help` speed, Ctrl-C, one end-to-end job).

Both return a `subprocess.CompletedProcess` (returncode, stdout, stderr), so a test reads the same
either way. The in-process run captures at the file-descriptor level, as a subprocess's pipes do:
Python's prints, argparse's messages, rich's console and native libraries' writes all land in the
result. Process-wide state a call may leave behind is reset by the autouse fixture in conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float | None = None, **env_extra: str) -> subprocess.CompletedProcess:
    """`pitome-export ARGS` in-process; `env_extra` is set in os.environ for the call only.

    `timeout` is accepted for the subprocess signature's sake and not enforced here.
    """
    from pipelines.cli.commands import main

    argv = [str(a) for a in args]
    with _environ({"COLUMNS": "160", **env_extra}), _captured() as streams:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors, --help and --version
            code = exc.code
            if isinstance(code, str):  # sys.exit("message"): printed to stderr, exit status 1
                print(code, file=sys.stderr)
                code = 1
            code = 0 if code is None else code
    return subprocess.CompletedProcess(["pitome-export", *argv], code, streams["stdout"], streams["stderr"])


def cli_process(
    *args: str, timeout: float = 300, cwd: Path | None = None, **env_extra: str
) -> subprocess.CompletedProcess:
    """`python -m pipelines.cli ARGS` as a subprocess, with this checkout on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 or lines[0].startswith("usage:"), result.stderr  # argparse adds its usage line
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _captured() -> Iterator[dict[str, str]]:
    """Point fds 1 and 2 (and sys.stdout/sys.stderr over them) at temporary files for the block."""
    streams: dict[str, str] = {}
    files = {name: tempfile.TemporaryFile() for name in ("stdout", "stderr")}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {1: os.dup(1), 2: os.dup(2)}
    os.dup2(files["stdout"].fileno(), 1)
    os.dup2(files["stderr"].fileno(), 2)
    # Never closed: a logging handler created during the call keeps its stream, which then writes
    # to whatever fd 1/2 is after the call (pytest's capture) instead of a closed file.
    out = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    err = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield streams
    finally:
        out.flush()
        err.flush()
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        for fd in saved.values():
            os.close(fd)
        for name, handle in files.items():
            handle.seek(0)
            streams[name] = handle.read().decode("utf-8", errors="replace")
            handle.close()
