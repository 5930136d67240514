"""`pitome-export schedule`: per-layer token counts and block FLOPs, merged vs unmerged."""

from __future__ import annotations

from ops.algos import algorithm, check_text_family
from ops.flops import schedule_flops
from ops.schedule import build_schedule
from pipelines.models.registry import REGISTRY, resolve

TEXT_MERGE_LAYERS = (0, 1, 2)


def _layout(name: str, seq_len: int | None) -> tuple[int, int, int, int, float, str | None]:
    """(depth, non-prefix tokens, prefix tokens, width, mlp ratio, text family or None) without
    loading weights."""
    spec = resolve(name)
    if spec.name in REGISTRY:
        tokens = (seq_len - 1) if (spec.kind == "text" and seq_len) else spec.num_tokens
        family = spec.text_family if spec.kind == "text" else None
        return spec.depth, tokens, spec.num_prefix, spec.dim, spec.mlp_ratio, family
    from pipelines.models.registry import load_model

    model, _ = load_model(spec, random_init=True)
    if spec.kind == "text":
        from ops.patch import hf_text

        cfg = model.config
        dim = getattr(cfg, "hidden_size", None) or cfg.dim
        hidden = getattr(cfg, "intermediate_size", None) or cfg.hidden_dim
        family = hf_text.family_of(hf_text.base_model(model)).name
        return hf_text.depth(model), (seq_len or spec.seq_len) - 1, 1, dim, hidden / dim, family
    width = model.embed_dim
    return len(model.blocks), model.patch_embed.num_patches, model.num_prefix_tokens, width, \
        model.blocks[0].mlp.fc1.out_features / width, None  # fmt: skip


def print_schedule(
    name: str, algo: str, ratio: float | None, merges: list[int] | None, seq_len: int | None, console
) -> None:
    from rich.table import Table

    depth, tokens, prefix, dim, mlp_ratio, family = _layout(name, seq_len)
    is_text = resolve(name).kind == "text"
    if is_text:
        check_text_family(algo, family)
    if ratio is None and merges is None:
        ratio = 0.9
    schedule = build_schedule(
        tokens, depth, algo=algo, ratio=ratio, merges=merges, num_prefix=prefix,
        merge_layers=TEXT_MERGE_LAYERS if is_text else None,
    )  # fmt: skip
    stage = algorithm(algo).stage
    merged, unmerged = schedule_flops(schedule, dim, mlp_ratio, stage)
    title = f"{name}: {algo}, " + (f"ratio {ratio}" if merges is None else "explicit schedule")
    table = Table(title=title)
    for column in ("layer", "tokens in", "merged (r)", "tokens out", "GFLOPs merged", "GFLOPs unmerged"):
        table.add_column(column, justify="right")
    info = schedule.to_dict()
    for i, (tin, r, tout, fm, fu) in enumerate(
        zip(info["tokens_in"], info["merges"], info["tokens_out"], merged, unmerged)
    ):
        table.add_row(str(i), str(tin), str(r), str(tout), f"{fm / 1e9:.3f}", f"{fu / 1e9:.3f}")
    table.add_row(
        "total",
        "",
        str(sum(info["merges"])),
        "",
        f"{sum(merged) / 1e9:.3f}",
        f"{sum(unmerged) / 1e9:.3f}",
        style="bold",
    )
    console.print(table)
    console.print(f"schedule: {','.join(map(str, schedule.merges))}")
    console.print(
        f"block FLOPs per item: {sum(merged) / 1e9:.2f} vs {sum(unmerged) / 1e9:.2f} GFLOP unmerged: "
        f"{sum(unmerged) / sum(merged):.2f}x fewer ({algo} reduces "
        + ("after the MLP)" if stage == "mlp" else "between attention and MLP)")
    )
