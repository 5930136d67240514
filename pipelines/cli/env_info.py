"""`pitome-export env`: what a bug report needs."""

from __future__ import annotations

import os
import platform


def environment() -> dict:
    from exporter.onnx_export import package_versions
    from exporter.runners import cpu_name
    from pipelines.jobs.report import tensorrt_version

    info = {"python": platform.python_version(), **package_versions(), "tensorrt": tensorrt_version()}
    import onnxruntime
    import torch

    info["onnxruntime providers"] = ", ".join(onnxruntime.get_available_providers())
    info["cpu"] = f"{cpu_name()} ({os.cpu_count()} logical cores)"
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CUDA not available)"
    info["torch threads"] = str(torch.get_num_threads())
    return info


def print_env(console) -> None:
    from rich.table import Table

    table = Table(title="pitome-export environment", show_header=False)
    for key, value in environment().items():
        table.add_row(key, str(value))
    console.print(table)
