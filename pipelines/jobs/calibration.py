"""Calibration inputs for static INT8: the model's own training data, a folder or file, or, for
random weights only, seeded synthetic inputs (the report says which)."""

from __future__ import annotations

from pipelines.data.labelled import DataError

DEFAULT_SAMPLES = 256
BATCH = 16


def calibration_feeds(job, spec, model, signature, seq_len: int | None) -> tuple[list[dict], str]:
    """(feed batches, where they came from); raises DataError for missing or empty data."""
    from pipelines.jobs.stages import open_data

    source = job.calibration
    count = int(source) if source is not None and source.isdigit() else None
    batch = 2 if job.static_batch else BATCH
    if source is not None and count is None:
        data = open_data(job, spec, model, seq_len, signature, source=source, limit=DEFAULT_SAMPLES)
    elif job.random_init:
        n = count or DEFAULT_SAMPLES
        feeds = []
        for i, start in enumerate(range(0, n, batch)):
            tensors = signature.example_inputs(min(batch, n - start), seed=job.seed + 7919 + i)
            feeds.append({name: tensors[name].numpy() for name in signature.input_names})
        return feeds, f"{n} seeded synthetic inputs (random-init weights: there is no real data to calibrate on)"
    elif spec.data is not None:
        data = open_data(
            job, spec, model, seq_len, signature, source=f"{spec.data}:train", limit=count or DEFAULT_SAMPLES
        )
    else:
        raise DataError(
            f"{spec.name} has no packaged training data to calibrate on: pass --calibration DIR or FILE "
            "(an image folder, an IDX folder, or a text file)"
        )
    if len(data) == 0:
        raise DataError(f"calibration data {source or spec.data} holds no samples")
    feeds = [feed for feed, _ in data.batches(batch)]
    return feeds, f"{len(data)} samples of {data.description}"
