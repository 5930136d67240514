"""The two edits a patch makes to a module, recorded so that `unpatch_model` undoes exactly them."""

from __future__ import annotations

import torch


def swap_class(module: torch.nn.Module, base: type) -> None:
    """Give `module` a class deriving from both `base` (our forward) and its own class."""
    original = type(module)
    module._pitome_original_class = original
    module.__class__ = type(f"{base.__name__}_{original.__name__}", (base, original), {})


def add_attributes(module: torch.nn.Module, **values: object) -> None:
    """Set `values` on `module` (submodules included) and record their names for unpatching."""
    for name, value in values.items():
        setattr(module, name, value)
    module.__dict__["_pitome_added"] = (*module.__dict__.get("_pitome_added", ()), *values)
