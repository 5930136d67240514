"""Where a harness leaves what it measured: `<stem>.json` (setup and rows, for tools) and
`<stem>.md` (the table, for people) in its results folder, each written whole, and the table
printed."""

from __future__ import annotations

import json
from pathlib import Path

from exporter.atomic import atomic_write_text


def write_record(folder: Path, stem: str, record: dict, table: str) -> None:
    """Write `record` as `<stem>.json` and `table` as `<stem>.md` into `folder`; print the table."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{stem}.json", json.dumps(record, indent=1))
    atomic_write_text(folder / f"{stem}.md", table + "\n")
    print(table)
