"""The task contract: what a task suite declares so that the runner can run, sweep and report it.

A task is its package ``tasks/<name>/`` and one default config ``configs/<name>.yaml``. The
package's ``__init__.py`` exports ``TASK``, a :class:`Task`; nothing else in the project names the
task. ``bgn-task <name>`` builds it with LightningCLI from the default config, fits, tests and
writes ``results.json``; ``bgn-task bench --task <name>`` sweeps norms x batch sizes x seeds (and
the task's own :attr:`Task.bench_axes`) and tables and plots each of its :attr:`Task.metrics`.

Example (a whole task's ``__init__.py``)::

    from tasks.common.contract import Metric, Task
    from tasks.common.vision import VisionDataModule
    from .module import MyModule

    TASK = Task(
        name="mytask",
        model_class=MyModule,
        datamodule_class=VisionDataModule,
        metrics=(Metric("test/acc", "top-1 accuracy"),),
        links=(("data.num_classes", "model.num_classes"),),
    )

Multi-stage tasks (NAS: search -> derive -> retrain) give :attr:`Task.run`, which replaces the
runner's single fit + test and gets a :class:`TaskRun`. What a run *does* (NAS's ``--stage``, the
adversarial ``--eval-only --ckpt``) is a :class:`RunOption` of the task (:attr:`Task.options`):
an option of the runner that the hook reads from :attr:`TaskRun.options`, never an init argument
(and hyper-parameter) of the model; :attr:`Task.extra_results` adds fields to
``results.json`` (and may write files beside it, such as ``genotype.json``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .settings import MovedKey, moved_keys
from .validate import check_choice

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

__all__ = ["AXIS_OWNERS", "Metric", "RunOption", "Task", "TaskRun", "check_axis"]

Direction = Literal["max", "min"]
Unit = Literal["%", "", "s"]


@dataclass(frozen=True)
class Metric:
    """A metric a task reports in ``results.json`` (``metrics[name]``).

    Attributes:
        name: the logged key, e.g. ``test/pgd_acc``.
        label: what it is, for tables and plot axes, e.g. ``PGD-20 accuracy``.
        direction: ``max`` (higher is better) or ``min``.
        unit: ``%`` (logged as a fraction in [0, 1], shown in percent), ``""`` (shown as logged)
            or ``s`` (seconds).
        ci: the key of its 95 % confidence half-width in the same unit (few-shot episodes), if any.
        stages: the values of the task's ``stage`` run option whose runs report it (NAS's
            ``search``, ``eval``...); empty: every run.
    """

    name: str
    label: str
    direction: Direction = "max"
    unit: Unit = "%"
    ci: str | None = None
    stages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or "/" not in self.name:
            raise ValueError(f"Metric: name must be a logged key such as 'test/acc', got {self.name!r}")
        if self.direction not in ("max", "min"):
            raise ValueError(f"Metric {self.name}: direction must be 'max' or 'min', got {self.direction!r}")
        if self.unit not in ("%", "", "s"):
            raise ValueError(f"Metric {self.name}: unit must be '%', '' or 's', got {self.unit!r}")

    def shown(self, value: float) -> float:
        """``value`` in the unit it is shown in (percent for ``%``)."""
        return 100.0 * value if self.unit == "%" else value

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is at least as good as ``b`` (ties count)."""
        return math.isclose(a, b) or (a > b if self.direction == "max" else a < b)

    @property
    def heading(self) -> str:
        """``"PGD-20 accuracy (%)"``: the label with its unit."""
        return f"{self.label} ({self.unit})" if self.unit else self.label


@dataclass(frozen=True)
class RunOption:
    """A run mode of a task: an option of the runner (a top-level config key), handed to the
    task's :attr:`Task.run` hook in :attr:`TaskRun.options`; not an init argument of the model.

    Example: ``RunOption("stage", "what the run does", type=str, default="search+eval",
    choices=("search", "eval", "search+eval"), legacy="model.stage")`` is ``--stage`` on the
    command line and ``stage:`` in a config file.

    Attributes:
        name: the config key and argument (``--<name>``), a Python identifier.
        help: what it does, for ``--help``.
        type: its type for the parser (``bool``, ``str | None``...).
        default: its value when not given.
        flag: its shortcut flag, e.g. ``--eval-only`` (default ``--<name>`` with dashes).
        value: set for a value-less flag: the value ``flag`` alone stands for (``"true"``).
        choices: the accepted values (checked when parsed: ``unknown <name> 'x'; choose from: ...``).
        legacy: where configs written before it was a run option set it (``model.stage``): one
            of the task's :attr:`Task.moved_keys`, still read there.
    """

    name: str
    help: str
    type: Any = str | None
    default: Any = None
    flag: str | None = None
    value: str | None = None
    choices: tuple[Any, ...] = ()
    legacy: str | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"RunOption: name must be a Python identifier, got {self.name!r}")
        if self.flag is None:
            object.__setattr__(self, "flag", "--" + self.name.replace("_", "-"))

    @property
    def argument(self) -> str:
        """The parser's argument, ``--<name>``."""
        return f"--{self.name}"


class TaskRun(Protocol):
    """What a multi-stage hook (:attr:`Task.run`) gets from the runner for one ``bgn-task`` run.

    The hook sets :attr:`metrics` (the ``test/*`` values of the final model, at least the task's
    metrics), :attr:`model` (the final model, for the G it used) and :attr:`checkpoint`.
    """

    config: dict[str, Any]
    """The full resolved config (``model``, ``data``, ``trainer``, ``seed_everything``)."""
    options: dict[str, Any]
    """The task's run options (:attr:`Task.options`) by name, as given or defaulted."""
    output: Path
    """The run's output directory (``results.json`` goes here)."""
    model: LightningModule
    datamodule: LightningDataModule
    trainer: Trainer
    metrics: dict[str, float]
    checkpoint: str | None
    norm: str | None
    """The norm that trained the reported network, when not ``model.norm`` (NAS's ``eval_norm``)."""

    def fit_and_test(
        self, model: LightningModule, trainer: Trainer, datamodule: LightningDataModule | None = None
    ) -> dict[str, float]:
        """Fit ``model``, test its best (or last) checkpoint; the ``val/*`` and ``test/*`` metrics."""

    def make_trainer(self, stage: str, **overrides: Any) -> Trainer:
        """A new Trainer from the run's config with ``overrides`` (trainer init arguments such as
        ``max_epochs``), logging and checkpointing under ``<output>/<stage>``."""


@dataclass(frozen=True)
class Task:
    """A task suite's declaration (see the module docstring).

    Attributes:
        name: the CLI name (``bgn-task <name>``); the package is ``tasks.<name>``.
        model_class: its LightningModule; init args ``norm``, ``groups`` and ``norm_kwargs`` are
            the shared norm arguments (:mod:`tasks.common.norms`).
        datamodule_class: its LightningDataModule (a :class:`~tasks.common.data.TaskDataModule`);
            its ``DATASETS`` class attribute names the accepted ``--data`` values.
        metrics: what it reports, the **primary metric first**; every name must be in
            ``results.json`` after a run.
        links: ``(source, target)`` LightningCLI argument links applied at instantiation, e.g.
            ``("data.num_classes", "model.num_classes")``.
        config: file name of its default config in ``configs/`` (default ``<name>.yaml``).
        bench_axes: axes ``bgn-task bench`` sweeps by default beside norm x batch size x seed:
            ``{"model.method": ("dann", "source_only")}`` (LightningCLI keys -> values).
        shortcuts: the task's own value shortcuts, flag -> LightningCLI argument, e.g.
            ``{"--method": "--model.method"}`` (beside the shared ``--norm``, ``--batch-size``...).
        flags: the task's own value-less shortcuts, flag -> (argument, value), e.g.
            ``{"--download": ("--data.download", "true")}``.
        options: the task's run modes (:class:`RunOption`): options of the runner, in
            :attr:`TaskRun.options` for :attr:`run`; their flags are shortcuts like the above.
        check_options: ``hook(options, config)`` checking the run options against the parsed
            config (``config.model.nodes``...) before anything is built; raises ``ValueError``
            (shown as one line, exit code 2).
        run: multi-stage hook replacing the single fit + test; gets a :class:`TaskRun`.
        extra_results: ``hook(run) -> dict`` of extra ``results.json`` fields (it may also write
            files into ``run.output``).
        bench_outputs: ``hook(rows, output) -> list of paths``: extra sweep outputs written into
            ``output`` after the standard report, from ``(row label, results.json record)`` pairs
            (e.g. the adversarial suite's accuracy-vs-eps curve per norm).
        smoke_args: run arguments that keep the contract test's 2-batch fit + test tiny (it
            already limits every loop to 2 batches and 1 epoch), e.g. fewer meta-test episodes.
    """

    name: str
    model_class: type
    datamodule_class: type
    metrics: tuple[Metric, ...]
    links: tuple[tuple[str, str], ...] = ()
    config: str | None = None
    bench_axes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    shortcuts: Mapping[str, str] = field(default_factory=dict)
    flags: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    options: tuple[RunOption, ...] = ()
    check_options: Callable[[Mapping[str, Any], Any], None] | None = None
    run: Callable[[TaskRun], None] | None = None
    extra_results: Callable[[TaskRun], dict[str, Any]] | None = None
    bench_outputs: Callable[[list[tuple[str, dict[str, Any]]], Path], list[Path]] | None = None
    smoke_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Task: name must be a Python identifier (its package name), got {self.name!r}")
        if not self.metrics:
            raise ValueError(f"Task {self.name}: declare at least one metric (the primary one first)")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"Task {self.name}: duplicate metric names in {names}")
        for key, values in self.bench_axes.items():
            try:
                check_axis(key, values)
            except ValueError as err:
                raise ValueError(f"Task {self.name}: bench {err}") from None
        for flag in (*self.shortcuts, *self.flags, *(o.flag for o in self.options)):
            if not flag.startswith("--") or "." in flag:
                raise ValueError(f"Task {self.name}: shortcut {flag!r} must be a --flag without dots")
        if len({o.name for o in self.options}) != len(self.options):
            raise ValueError(f"Task {self.name}: duplicate run option names")
        if self.config is None:
            object.__setattr__(self, "config", f"{self.name}.yaml")

    @property
    def moved_keys(self) -> tuple[MovedKey, ...]:
        """The config keys that moved, still read at their old places: the run options' legacy keys
        (``model.stage`` -> ``stage``) and the flat keys of the model's settings groups
        (``model.lr`` -> ``model.sgd.lr``, :func:`tasks.common.settings.moved_keys`).

        The command line's ``--model.lr X`` is rewritten to ``--model.sgd.lr X`` (:attr:`all_shortcuts`);
        a config file's ``model: {lr: X}`` is read as ``model: {sgd: {lr: X}}`` (unless the same
        file sets the new key too, which wins), with one log line saying where they live now.
        """
        options = tuple(MovedKey(o.legacy, o.name, o.type) for o in self.options if o.legacy)
        return options + moved_keys(self.model_class)

    @property
    def all_shortcuts(self) -> dict[str, str]:
        """Value shortcuts: :attr:`shortcuts`, the run options' flags and the :attr:`moved_keys`."""
        out = dict(self.shortcuts)
        for o in self.options:
            if o.value is None:
                out[str(o.flag)] = o.argument
        out.update({f"--{m.old}": f"--{m.new}" for m in self.moved_keys})
        return out

    @property
    def all_flags(self) -> dict[str, tuple[str, str]]:
        """Value-less shortcuts: :attr:`flags` and the run options' value-less flags."""
        out = dict(self.flags)
        out.update({str(o.flag): (o.argument, o.value) for o in self.options if o.value is not None})
        return out

    @property
    def primary(self) -> Metric:
        """The metric a run is judged by (the first one)."""
        return self.metrics[0]

    def metric(self, name: str) -> Metric:
        """The declared metric ``name``.

        Raises:
            ValueError: listing the declared metrics.
        """
        names = [m.name for m in self.metrics]
        check_choice("metric", name, names, problem=f"task {self.name} reports no metric {name!r}")
        return self.metrics[names.index(name)]


AXIS_OWNERS = ("model", "data", "trainer")
"""What a sweep axis may set: an init argument of the task's model, its DataModule or the Trainer."""


def check_axis(key: str, values: Sequence[Any], owners: Mapping[str, type] | None = None) -> None:
    """The one check of a sweep axis (a task's :attr:`Task.bench_axes`, a ``--vary`` item, a
    ``bgn-task bench`` grid's axes).

    Args:
        key: ``model.<arg>``, ``data.<arg>`` or ``trainer.<arg>``; ``<arg>`` may be a field of a
            settings group (``model.sgd.lr``) or its flat key (``model.lr``).
        values: the axis's values: at least one, all distinct.
        owners: the classes behind ``model``, ``data`` and ``trainer``; given, ``<arg>`` must be an
            init argument of its owner.

    Raises:
        ValueError: naming the axis and what it must be.
    """
    owner, _, arg = key.partition(".")
    if owner not in AXIS_OWNERS or not arg:
        raise ValueError(f"axis {key!r} must be model.<arg>, data.<arg> or trainer.<arg>")
    if not values or len(set(values)) != len(values):
        raise ValueError(f"axis {key!r} needs distinct values, got {list(values)}")
    if owners is not None:
        cls = owners[owner]
        init = inspect.signature(cls.__init__).parameters
        params = [p for p in init if p not in ("self", "args", "kwargs")]
        moved = [(m.old, m.new) for m in moved_keys(cls, owner)]  # (model.lr, model.sgd.lr)
        if arg not in {*params, *(k.partition(".")[2] for pair in moved for k in pair)}:
            raise ValueError(f"axis {key!r}: {cls.__name__} takes no {arg!r}; it takes: {', '.join(params)}")
