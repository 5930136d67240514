"""The jobs' options, declared once: each job field that a flag sets carries its flag, help group,
type, choices and help as dataclass metadata (`option(...)`), and its default as the field's own.

The command line is built from these declarations (`add_options`), the job is filled from the
parsed flags (`job_fields`), a job made in Python is checked against the same choices
(`check_choices`), and the report lists the options by group (`options_by_group`). Light on
purpose: `pitome-export --help` imports this module and nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

# Help groups in `--help` order: key -> title.
GROUPS = {
    "model": "model",
    "search": "budget and search",
    "merging": "merging",
    "training": "fine-tuning",
    "export": "export",
    "validation": "validation",
    "precision": "precision",
    "benchmark": "benchmark",
    "tensorrt": "tensorrt (--target trt)",
    "output": "output",
}
RUN_COMMANDS = ("export", "sweep", "tune")  # the commands that run a job (the default of `Option.commands`)
EXPLORE_COMMANDS = ("export", "sweep")  # the commands whose merge settings the user chooses (tune searches them)
# Commands that also take every flag of others: finetune exports its result, so it takes export's flags
COMMAND_INCLUDES = {"finetune": ("export",)}


@dataclass(frozen=True)
class Option:
    """How one job field is set from the command line.

    `parts` declares a tuple-valued field set by one flag per element (`--min-batch`,
    `--opt-batch`, `--max-batch` -> `trt_batches`); each part's default is the field's element.
    """

    flags: tuple[str, ...]
    group: str = ""
    help: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    action: str | None = None  # "store_true" / "store_false": a switch
    negation: str | None = None  # a twin flag that stores False ("--no-prop-attn")
    exclusive: bool = False  # mutually exclusive with the group's other exclusive options
    commands: tuple[str, ...] = RUN_COMMANDS
    parts: tuple[Option, ...] = ()

    @property
    def positional(self) -> bool:
        """Whether the option is a positional argument (a flag without a dash: "model")."""
        return bool(self.flags) and not self.flags[0].startswith("-")


def option(*flags: str, default: Any = None, factory: Callable[[], Any] | None = None, **declaration: Any) -> Any:
    """A dataclass field whose default is `default` (or `factory()`; `dataclasses.MISSING`: a
    required field) and whose flag is declared by `flags` and `declaration` (the other `Option` fields)."""
    metadata = {"option": Option(flags, **declaration)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def part(*flags: str, **declaration: Any) -> Option:
    """One element's flag of a tuple-valued option (see `Option.parts`)."""
    return Option(flags, **declaration)


def declared(job_cls: type, command: str | None = None) -> list[tuple[dataclasses.Field, Option]]:
    """(field, option) of every declared option of `job_cls`, in field order; only those of
    `command` when given."""
    pairs = [(f, f.metadata["option"]) for f in dataclasses.fields(job_cls) if "option" in f.metadata]
    if command is None:
        return pairs
    accepted = {command, *COMMAND_INCLUDES.get(command, ())}
    return [(f, opt) for f, opt in pairs if accepted.intersection(opt.commands)]


def default_of(field: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for a factory)."""
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None if field.default is MISSING else field.default


def flag_text(opt: Option) -> str:
    """The flag a user types for an option: "--opset", or "--min-mean-cosine/--min-cosine"."""
    if opt.parts:
        return "/".join(p.flags[-1] for p in opt.parts)
    return opt.flags[-1]


def _part_dest(name: str, index: int) -> str:
    return f"{name}_{index}"


def _argument(container, dest: str, opt: Option, default: Any) -> None:
    """One `add_argument` call for an option (a positional when its flag has no dash)."""
    kwargs: dict[str, Any] = {"help": opt.help, "default": default}
    if opt.action is not None:
        kwargs["action"] = opt.action
    else:
        kwargs.update(type=opt.type, choices=opt.choices, metavar=opt.metavar)
    if not opt.positional:
        kwargs["dest"] = dest
        if opt.action is None and opt.choices is None and opt.metavar is None:  # named by the flag, not the field
            kwargs["metavar"] = opt.flags[-1].lstrip("-").upper().replace("-", "_")
    container.add_argument(*opt.flags, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})
    if opt.negation is not None:
        container.add_argument(opt.negation, dest=dest, action="store_false", default=default)


def add_options(parser: argparse.ArgumentParser, job_cls: type, command: str) -> None:
    """Add `job_cls`'s options of `command` to `parser`, in help groups (GROUPS order)."""
    pairs = declared(job_cls, command)
    for key, title in GROUPS.items():
        members = [(f, opt) for f, opt in pairs if opt.group == key]
        if not members:
            continue
        group = parser.add_argument_group(title)
        exclusive = group.add_mutually_exclusive_group() if any(opt.exclusive for _, opt in members) else None
        for f, opt in members:
            container = exclusive if opt.exclusive else group
            if opt.parts:
                for index, (sub, value) in enumerate(zip(opt.parts, default_of(f))):
                    _argument(container, _part_dest(f.name, index), sub, value)
            else:
                _argument(container, f.name, opt, default_of(f))


def job_fields(args: argparse.Namespace, job_cls: type, command: str) -> dict[str, Any]:
    """The job fields that `command`'s parsed flags set, by field name."""
    fields = {}
    for f, opt in declared(job_cls, command):
        if opt.parts:
            fields[f.name] = tuple(getattr(args, _part_dest(f.name, i)) for i in range(len(opt.parts)))
        else:
            fields[f.name] = getattr(args, f.name)
    return fields


def check_choices(job: Any) -> None:
    """A job made in Python holds only values its flags could give: raise PitomeError otherwise."""
    from ops.errors import PitomeError

    for f, opt in declared(type(job)):
        for sub, value in zip(opt.parts, getattr(job, f.name)) if opt.parts else [(opt, getattr(job, f.name))]:
            if sub.choices is not None and value is not None and value not in sub.choices:
                choices = ", ".join(str(c) for c in sub.choices)
                raise PitomeError(f"unknown {flag_text(sub)} {value!r}; choose one of {choices}")


def options_by_group(job: Any, changed_only: bool = True) -> dict[str, dict[str, Any]]:
    """{group: {flag: value}} of `job`'s options (the model positional left out); with
    `changed_only`, only those that differ from their default: what the run changed."""
    grouped: dict[str, dict[str, Any]] = {}
    for f, opt in declared(type(job)):
        value = getattr(job, f.name)
        if opt.positional or (changed_only and value == default_of(f)):
            continue
        grouped.setdefault(opt.group, {})[flag_text(opt)] = list(value) if isinstance(value, tuple) else value
    return {key: grouped[key] for key in GROUPS if key in grouped}


# argparse types: a value, or an ArgumentTypeError that argparse turns into one usage line (exit 2).


def _number(text: str, convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str) -> Any:
    """argparse type body: `convert(text)` when `accept` takes it, else a one-line usage error
    saying what was `expected`."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"{expected}, got {text}")
    return value


def ratio(text: str) -> float:
    """argparse type: the fraction of tokens kept per layer, in (0, 1]."""
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "ratio must be a number in (0, 1]")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(text, float, lambda v: 0.0 <= v <= 1.0, "expected a fraction in [0, 1]")


def points(text: str) -> float:
    """argparse type: a finite number of accuracy points >= 0."""
    return _number(text, float, lambda v: 0.0 <= v < float("inf"), "expected a number of points >= 0")


def confidence(text: str) -> float:
    """argparse type: a one-sided confidence level in [0.5, 1) (0.5: the point estimate itself)."""
    return _number(text, float, lambda v: 0.5 <= v < 1.0, "expected a confidence level in [0.5, 1)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "expected a positive integer")


def seed(text: str) -> int:
    """argparse type: a random seed, an integer in [0, 2**32)."""
    return _number(text, int, lambda v: 0 <= v < 2**32, "expected a seed, an integer in [0, 2**32)")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, lambda v: 0.0 < v < float("inf"), "expected a positive number")


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0 (a loss weight)."""
    return _number(text, float, lambda v: 0.0 <= v < float("inf"), "expected a number >= 0")


def minutes(text: str) -> float:
    """argparse type: a positive, finite number of minutes."""
    return _number(text, float, lambda v: 0.0 < v < float("inf"), "expected a positive number of minutes")


def schedule(text: str) -> list[int]:
    """argparse type: an explicit per-layer schedule of tokens merged, "19,17,..."."""
    from ops.errors import ScheduleError
    from ops.schedule import parse_schedule

    try:
        return parse_schedule(text)
    except ScheduleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def name_list(text: str) -> list[str]:
    """argparse type: comma-separated names or patterns, "classifier,patch_embed" ("none": empty)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return [] if names == ["none"] else names


def ratio_list(text: str) -> list[float]:
    """argparse type: comma-separated ratios, "0.95,0.9"."""
    return [ratio(part) for part in text.split(",")]


ALGOS = ("pitome", "tome", "tofu", "dct", "mctf", "crossget", "diffrate")  # ops.algos.NAMES
DEFAULT_ALGOS = ("pitome", "tome")  # what sweep and tune compare unless told


def _choice_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    """argparse type body: comma-separated values, each one of `choices`."""
    values = text.split(",")
    for value in values:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return values


def choice_list(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """argparse type for comma-separated values, each one of `choices` (e.g. a harness's models)."""
    return lambda text: _choice_list(text, choices, what)


def algo_at_ratio(text: str) -> tuple[str, float]:
    """argparse type: an algorithm at a ratio, "pitome@0.9"."""
    algo, at, value = text.partition("@")
    if not at:
        raise argparse.ArgumentTypeError(f"expected ALGO@RATIO (e.g. pitome@0.9), got {text!r}")
    return _choice_list(algo, ALGOS, "algo")[0], ratio(value)


def algo_list(text: str) -> list[str]:
    """argparse type: comma-separated algorithms, "pitome,tome"."""
    return _choice_list(text, ALGOS, "algo")


PRECISIONS = ("fp32", "fp16", "int8")  # precisions a tune search may try (int8: dynamic and static)


def precision_list(text: str) -> list[str]:
    """argparse type: comma-separated precisions from PRECISIONS."""
    return _choice_list(text, PRECISIONS, "precision")
