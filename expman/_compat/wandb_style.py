"""A W&B-style module API for quick scripts: `expman.init`, `log`, `finish`, `config`, `run`.

    import expman as wandb
    run = wandb.init(project="demo", config={"lr": 0.01})
    wandb.config.epochs = 10             # logged as a parameter at once
    for epoch in range(10):
        wandb.log({"loss": 1 / (epoch + 1)})   # step 0, 1, 2, ...
    wandb.finish()

A thin layer over `start_experiment`: one current run per process, a step counter, and a
config that logs parameters when set. What differs from W&B is listed in
docs/integrations.md ("W&B-style API").
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

from expman._errors import ExpmanError
from expman._rank.experiment import Experiment

_logger = logging.getLogger("expman")

_lock = threading.Lock()
_current: ScriptRun | None = None


class Config:
    """A run's parameters as a dict that also reads and writes as attributes; every write
    is logged to the run's config.yaml at once (`config.lr = 0.1`, `config.update({...})`)."""

    def __init__(self, owner: ScriptRun | None) -> None:
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_data", {})

    def _run(self) -> ScriptRun:
        owner = self._owner if self._owner is not None else _current
        if owner is None:
            raise ExpmanError("call expman.init() before setting expman.config")
        return owner

    def _items(self) -> dict[str, Any]:
        owner = self._owner if self._owner is not None else _current
        return {} if owner is None else owner.config._data

    def update(self, values: Any = None, allow_val_change: bool | None = None, **kwargs: Any) -> None:
        """Set several keys at once (a dict, an argparse.Namespace, or keyword arguments)."""
        merged = {**_as_dict(values), **kwargs}
        if not merged:
            return
        run = self._run()
        run.exp.log_parameters(merged)  # checks every value before keeping any
        run.config._data.update(merged)

    def setdefaults(self, values: Any) -> None:
        """Set the keys that are not set yet (W&B's `config.setdefaults`)."""
        current = self._items()
        self.update({k: v for k, v in _as_dict(values).items() if k not in current})

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def __setattr__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self._items()[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def __delitem__(self, key: str) -> None:
        raise TypeError("parameters cannot be removed from a run once logged")

    def get(self, key: str, default: Any = None) -> Any:
        return self._items().get(key, default)

    def keys(self):  # noqa: ANN201 - dict views
        return self._items().keys()

    def values(self):  # noqa: ANN201
        return self._items().values()

    def items(self):  # noqa: ANN201
        return self._items().items()

    def as_dict(self) -> dict[str, Any]:
        return dict(self._items())

    def __contains__(self, key: object) -> bool:
        return key in self._items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"<expman config {self._items()!r}>"


class ScriptRun:
    """The run `expman.init()` returns: the W&B-style verbs (`log`, `config`, `finish`)
    over an `expman.Experiment`, which is `run.exp`; other attributes (`log_metric`,
    `run_dir`, `uid`, `start_experiment`, ...) are the Experiment's."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.config = Config(self)
        self.step = 0  # the step the next stepless log() goes to (W&B's run.step)

    @property
    def id(self) -> str:
        return self.exp.uid

    @property
    def project(self) -> str:
        return self.exp.experiment

    @property
    def dir(self) -> str:
        return str(self.exp.run_dir)

    def log(self, data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        """Log a dict of values at the current step, then move to the next step.

        With `step`, log at that step and stay on it (W&B's semantics: the next stepless
        call also lands there, then moves on). `commit=False` stays on the current step.
        Nested dicts are flattened with "/" ("train": {"loss": 1} is "train/loss").
        """
        if not isinstance(data, dict):
            raise TypeError(f"log takes a dict of values, got {type(data).__name__}")
        if step is not None:
            step = int(step)
            at = step
            if step > self.step:
                self.step = step
            elif step < self.step:  # W&B drops such data with a warning; expman keeps it
                _logger.debug("expman: logging at step %d, below the current step %d", step, self.step)
            advance = commit is True
        else:
            at = self.step
            advance = commit is not False
        scalars = {}
        for key, value in _flatten(data):
            if isinstance(value, Media) or (isinstance(value, (list, tuple)) and value
                                            and all(isinstance(v, Media) for v in value)):
                items = value if isinstance(value, (list, tuple)) else [value]
                for i, item in enumerate(items):
                    item._log(self.exp, key if len(items) == 1 else f"{key}/{i}", at)
            else:
                scalars[key] = value
        self.exp.log_metrics(scalars, step=at)
        if advance and at >= self.step:
            self.step = at + 1

    def finish(self, exit_code: int | None = None, quiet: bool | None = None, *,
               status: str | None = None, timeout: float | None = None) -> bool:
        """Finish the run: status finished, or failed for a non-zero `exit_code`."""
        global _current
        if status is None:
            status = "failed" if exit_code not in (None, 0) else "finished"
        with _lock:
            if _current is self:
                _current = None
        return self.exp.finish(status, timeout)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "exp":
            raise AttributeError(name)
        return getattr(self.exp, name)

    def __enter__(self) -> ScriptRun:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        global _current
        with _lock:
            if _current is self:
                _current = None
        self.exp.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<expman run {self.exp.experiment}/{self.exp.name} id={self.exp.uid} step={self.step}>"


class Media:
    """What `log({...})` stores as media rather than as a number (W&B's data types)."""

    def _log(self, exp: Experiment, key: str, step: int) -> None:
        raise NotImplementedError


class Image(Media):
    """`expman.log({"samples": expman.Image(array_or_pil_or_path, caption="...")})`: numpy
    HxW / HxWxC (uint8, or floats in [0, 1]), a PIL image, a CHW torch tensor, or a file."""

    def __init__(self, data_or_path: Any, mode: str | None = None, caption: str | None = None, **_: Any) -> None:
        self.data, self.caption = data_or_path, caption

    def _log(self, exp: Experiment, key: str, step: int) -> None:
        exp.log_image(key, self.data, step=step, caption=self.caption)


class Histogram(Media):
    """`expman.Histogram(values, num_bins=64)` or `expman.Histogram(np_histogram=(counts, edges))`."""

    def __init__(self, sequence: Any = None, np_histogram: Any = None, num_bins: int = 64) -> None:
        if (sequence is None) == (np_histogram is None):
            raise ValueError("Histogram takes a sequence of values or np_histogram=(counts, edges)")
        self.sequence, self.np_histogram, self.num_bins = sequence, np_histogram, num_bins

    def _log(self, exp: Experiment, key: str, step: int) -> None:
        if self.np_histogram is not None:
            counts, edges = self.np_histogram
            exp.log_histogram(key, step=step, edges=edges, counts=counts)
        else:
            exp.log_histogram(key, self.sequence, step=step, bins=self.num_bins)


class Table(Media):
    """`expman.Table(columns=[...], data=[[...], ...])` or `expman.Table(dataframe=df)`; stored
    as Parquet (`run.table(key)`)."""

    def __init__(self, columns: list[str] | None = None, data: Any = None, dataframe: Any = None, **_: Any) -> None:
        if dataframe is not None:
            self.table: Any = dataframe
        else:
            rows = [list(r) for r in (data or [])]
            names = list(columns) if columns is not None else [f"col{i}" for i in range(len(rows[0]) if rows else 0)]
            if any(len(r) != len(names) for r in rows):
                raise ValueError(f"Table: every row must have {len(names)} values (the columns {names})")
            self.table = {name: [r[i] for r in rows] for i, name in enumerate(names)}
        self.columns = columns

    def add_data(self, *values: Any) -> None:
        if not isinstance(self.table, dict):
            raise TypeError("add_data works on a Table made from columns and data")
        if len(values) != len(self.table):
            raise ValueError(f"add_data takes {len(self.table)} values, got {len(values)}")
        for column, value in zip(self.table.values(), values):
            column.append(value)

    def _log(self, exp: Experiment, key: str, step: int) -> None:
        exp.log_table(key, self.table, step=step)


class Video(Media):
    """`expman.Video(frames, fps=4)`: numpy frames (T, C, H, W) or (N, T, C, H, W) as W&B
    takes them, or a video file (GIF, MP4, ...)."""

    def __init__(self, data_or_path: Any, caption: str | None = None, fps: float = 4, format: str | None = None,  # noqa: A002
                 **_: Any) -> None:
        self.data, self.caption, self.fps = data_or_path, caption, fps

    def _log(self, exp: Experiment, key: str, step: int) -> None:
        from expman._rank import media

        layout = None
        if not isinstance(self.data, (str, bytes)) and not hasattr(self.data, "__fspath__"):
            layout = {4: "TCHW", 5: "NTCHW"}.get(getattr(self.data, "ndim", 0))
        media.log_video(exp._channel, exp._sender, key, self.data, self.fps, step, caption=self.caption,
                        layout=layout)


class Audio(Media):
    """`expman.Audio(samples, sample_rate=16000)`: numpy samples (n,) or (n, channels)."""

    def __init__(self, data_or_path: Any, sample_rate: int | None = None, caption: str | None = None) -> None:
        if isinstance(data_or_path, (str, bytes)) or hasattr(data_or_path, "__fspath__"):
            raise TypeError("Audio takes an array of samples; log an audio file with log_artifact()")
        if sample_rate is None:
            raise ValueError("Audio needs sample_rate= for an array of samples")
        self.data, self.sample_rate, self.caption = data_or_path, sample_rate, caption

    def _log(self, exp: Experiment, key: str, step: int) -> None:
        from expman._rank import media

        media.log_audio(exp._channel, exp._sender, key, self.data, self.sample_rate, step, caption=self.caption)


_MODES = (None, "online", "offline", "shared")


def init(
    project: str | None = None,
    name: str | None = None,
    config: Any = None,
    *,
    tags: list[str] | None = None,
    notes: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    dir: str | None = None,  # noqa: A002 - W&B's name
    id: str | None = None,  # noqa: A002
    resume: Any = None,
    entity: str | None = None,
    mode: str | None = None,
    reinit: Any = None,
    settings: Any = None,
    **start_kwargs: Any,
) -> ScriptRun:
    """Start a run and make it the current one (`expman.run`); returns it.

    `project` is the experiment and `name` the run's name; `config` (a dict or an
    argparse.Namespace) is logged as parameters. `dir` is the root folder (`root=` too);
    `id` the run id; `resume` with an `id` reopens that run. `group` and `job_type`
    become tags ("group:<g>", "job_type:<t>"), `notes` a line in run.log. `entity` and
    `settings` are accepted and unused (there is no server). Any other keyword goes to
    `expman.start_experiment` (`collector=`, `log_hardware=`, ...). A run that is still
    current is finished first.
    """
    global _current
    if mode not in _MODES:
        raise ValueError(f"mode {mode!r} is not supported: expman always records (online, offline)")
    from expman._rank.start import start_experiment

    tag_list = list(tags or [])
    tag_list += [f"group:{group}"] if group else []
    tag_list += [f"job_type:{job_type}"] if job_type else []
    if dir is not None:
        start_kwargs.setdefault("root", dir)
    if id is not None and resume not in (None, False, "never"):
        start_kwargs.setdefault("experiment_uid", id)
    elif id is not None:
        start_kwargs.setdefault("run_id", id)
    with _lock:
        previous, _current = _current, None
    if previous is not None:
        previous.finish()
    exp = start_experiment(project, name, tags=tag_list, **start_kwargs)
    run = ScriptRun(exp)
    if notes:
        exp.info(str(notes))
    if config is not None:
        run.config.update(config)
    with _lock:
        _current = run
    return run


def log(data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
    """Log to the current run (see `ScriptRun.log`)."""
    run = _current
    if run is None:
        raise ExpmanError("call expman.init() before expman.log()")
    run.log(data, step=step, commit=commit)


def finish(exit_code: int | None = None, quiet: bool | None = None) -> None:
    """Finish the current run, if any (failed for a non-zero `exit_code`)."""
    run = _current
    if run is not None:
        run.finish(exit_code)


def login(*args: Any, **kwargs: Any) -> bool:
    """There is no server to log in to: runs are files. Returns True so scripts go on."""
    return True


def current_run() -> ScriptRun | None:
    return _current


config = Config(None)


def _as_dict(values: Any) -> dict[str, Any]:
    if values is None:
        return {}
    if isinstance(values, dict):
        return dict(values)
    if isinstance(values, Config):
        return values.as_dict()
    if hasattr(values, "__dict__") and not isinstance(values, type):  # argparse.Namespace and similar
        return {k: v for k, v in vars(values).items() if not k.startswith("_")}
    raise TypeError(f"config must be a dict or an argparse.Namespace, got {type(values).__name__}")


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value
