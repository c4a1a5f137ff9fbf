"""The Experiment a training rank logs into: the user's verbs and the hot path.

The `log_*` calls only hand their data to the run's channel (expman/_rank/channel.py);
the process's sender thread drains it every few milliseconds, packs frames and ships
them to a collector.

A plain point (a float or int value, an int step, no time) goes into the run's point
ring in shared memory (expman/_storage/ring.py): one dict lookup, a few class checks and
three memoryview stores, the key id last, so what a call accepted survives the process's
kill -9 and the host's collector stores it; the sender reads the ring back as a frame's
columns. The point's slot is `ring.slot`, read and bumped with only attribute operations
and stores between: CPython checks for a thread switch only at calls and backward jumps,
so none falls between them, and threads logging into one run never share a slot. Points
the plain record does not fit (no step, a time, a huge int) take `PointRing.put`.

Device tensors, runs without a ring, and every point while the ring has no free slot
take the channel's list instead: one `list.extend` of a 4-tuple (key id, value, step,
timestamp), atomic under the GIL, its temporary tuple dead at once. A point put there
closes the ring until the sender has framed the list, which keeps the points in order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from expman._errors import ExpmanError
from expman._rank import console
from expman._rank.channel import RunChannel
from expman._rank.values import Metric, check_key, check_log_text, eval_key, check_params, coerce_number, coerce_step, coerce_time
from expman._storage.layout import FINAL_STATUSES
from expman._storage.ring import NoRing, PointRing, near
from expman._wire.columns import fits_int64
from expman._wire.curve_keys import curve_refusal_hint

if TYPE_CHECKING:
    from expman._rank.sender import Sender

log = logging.getLogger("expman")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_FINISH_TIMEOUT = 30.0
RUN_DIR_WAIT_S = 10.0  # how long `run_dir` waits for a separate collector to name the run's folder


class _ClosedBuffer:
    """Stands in for the point buffer once a run is finished: counts and reports late points."""

    __slots__ = ("channel", "warned")

    def __init__(self, channel: RunChannel) -> None:
        self.channel = channel
        self.warned = False

    def extend(self, items: Iterable[Any]) -> None:
        self.channel.late += len(items) // 4  # type: ignore[arg-type]
        if not self.warned:
            self.warned = True
            log.error("expman: %s; points dropped", self.channel.why_closed())

    def __len__(self) -> int:
        return 0


class Experiment:
    """One run, as seen from one rank. Use `expman.start_experiment()` to get one."""

    def __init__(
        self,
        *,
        channel: RunChannel,
        sender: Sender,
        experiment: str,
        name: str,
        world_size: int,
        parent: str | None,
        tags: list[str],
        finish_timeout: float,
        start_child: Callable[..., Experiment],
    ) -> None:
        self.uid = channel.uid
        self.name = name
        self.experiment = experiment
        self.root = channel.root
        self.rank = channel.rank
        self.world_size = world_size
        self.host = channel.host
        self.parent = parent
        self.tags = tags
        self.finish_timeout = finish_timeout
        self.status = "running"
        self._channel = channel
        self._sender = sender
        self._start_child = start_child
        # Hot-path state: the channel's buffers, held directly (one attribute lookup a call).
        self._key_ids: dict[str, int] = {}
        self._key_names = channel.key_names
        self._buf: list[Any] | _ClosedBuffer = channel.points
        self._intern_lock = threading.Lock()
        ring = channel.ring = PointRing.create(sender.sender_id, channel.uid, channel.rank, channel.host) \
            if near(sender.endpoint, channel.host) else None
        self._ring: PointRing | NoRing = ring if ring is not None else NoRing()
        self._children: list[Experiment] = []
        self._child_names: dict[str | None, int] = {}
        sender.register(channel)

    # --- hot path ------------------------------------------------------------------
    def log_metric(
        self,
        key: str,
        value: Any,
        step: int | None = None,
        timestamp: Any = None,
        created_at: Any = None,
    ) -> None:
        """Record one point. Never blocks; bad values raise TypeError naming the key."""
        kid = self._key_ids.get(key)
        if kid is None:
            kid = self._intern(key)
        if (value.__class__ is not float and value.__class__ is not int) or step.__class__ is not int \
                or timestamp is not None or created_at is not None:
            self._log_point(kid, key, value, step, timestamp if timestamp is not None else created_at)
            return
        ring = self._ring
        i = ring.slot
        if i < ring.stop:  # from here to the bump of ring.slot no call: no thread switch (module docstring)
            try:
                ring.values[i] = value
                ring.steps[i] = step
            except (OverflowError, ValueError):  # an int beyond float64, a step beyond int64
                self._log_point(kid, key, value, step, None)
                return
            ring.keys[i] = kid
            ring.slot = i + 1
            return
        if i == ring.stop and ring.put(kid, value, step, None):  # put() starts the next lap, or maps more
            return
        self._buf.extend((kid, value, step, None))
        ring.stop = -1  # closed until the sender has framed the list (no-op without a ring)

    def _log_point(self, kid: int, key: str, value: Any, step: Any, when: Any) -> None:
        """log_metric's other cases: values to coerce (text goes its own way; a device
        tensor is kept as is, no sync here), no step, a caller's timestamp."""
        if value.__class__ is not float and value.__class__ is not int:
            value = coerce_number(key, value)
            if value.__class__ is str:
                self._log_text(kid, key, value, step, when, None)
                return
        if step is not None and step.__class__ is not int:
            step = coerce_step(key, step)
        if when is not None:
            when = coerce_time(key, when)
        ring = self._ring
        if value.__class__ is float or value.__class__ is int:
            if ring.put(kid, value, step, when):
                if value.__class__ is int or step is not None and step.__class__ is int:
                    self._warn_extremes(key, value, step)
                return
        else:
            self._channel.held += 1
        self._buf.extend((kid, value, step, when))
        ring.stop = -1

    def _warn_extremes(self, key: str, value: Any, step: Any) -> None:
        """What the list's packer says of such points (expman/_wire/columns.py), said for the ring's."""
        if value.__class__ is int and not fits_float64(value):
            log.error("expman: run %s: metric %r: a metric value is too large for float64; stored as inf", self.uid, key)
        if step is not None and not fits_int64(step):
            log.error("expman: run %s: metric %r: a step outside the int64 range is stored as no step", self.uid, key)

    def log_metrics(
        self,
        metrics: dict[str, Any] | Iterable[Metric],
        step: int | None = None,
        timestamp: Any = None,
    ) -> None:
        """Record several points: a dict of key -> value at one step, or a list of Metric."""
        if not isinstance(metrics, dict):
            for m in metrics:
                if not isinstance(m, Metric):
                    raise TypeError(f"log_metrics takes a dict or a list of expman.Metric, got {type(m).__name__}")
                self.log_metric(m.key, m.value, m.step if m.step is not None else step, m.timestamp or timestamp)
            return
        if step is not None and step.__class__ is not int:
            step = coerce_step("<step>", step)
        if timestamp is not None:
            timestamp = coerce_time("<timestamp>", timestamp)
        ids = self._key_ids
        ring = self._ring
        values, steps, keys = ring.values, ring.steps, ring.keys
        plain = step.__class__ is int and timestamp is None  # what the ring's three stores hold
        flat: list[Any] = []  # points for the list: once one goes there, the rest follow (order)
        for key, value in metrics.items():
            kid = ids.get(key)
            if kid is None:
                kid = self._intern(key)
            if value.__class__ is not float and value.__class__ is not int:
                value = coerce_number(key, value)
                if value.__class__ is str:
                    self._log_text(kid, key, value, step, timestamp, None)
                    continue
                if value.__class__ is not float:  # a device tensor, kept as is: no sync here
                    self._channel.held += 1
                    flat += (kid, value, step, timestamp)
                    continue
            if flat:
                flat += (kid, value, step, timestamp)
                continue
            if plain:
                i = ring.slot
                if i < ring.stop:  # as in log_metric: no call until ring.slot is bumped
                    try:
                        values[i] = value
                        steps[i] = step
                    except (OverflowError, ValueError):
                        pass  # put() stores it
                    else:
                        keys[i] = kid
                        ring.slot = i + 1
                        continue
            if not ring.put(kid, value, step, timestamp):
                flat += (kid, value, step, timestamp)
        if flat:
            self._buf.extend(flat)
            ring.stop = -1

    def log_eval_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record evaluation metrics (OPSML's verb): points whose keys carry the `eval/`
        prefix, so readers and DuckDB pick them out (`key LIKE 'eval/%'`)."""
        self.log_metrics({eval_key(k): v for k, v in metrics.items()}, step=step)

    def _intern(self, key: str) -> int:
        check_key(key)
        with self._intern_lock:
            kid = self._key_ids.get(key)
            if kid is None:
                kid = len(self._key_names)
                if self._channel.ring is not None:
                    self._channel.ring.name(kid, key)  # before the key's first point can be in the ring
                self._key_names.append(key)
                self._key_ids[key] = kid
        return kid

    def _log_text(self, kid: int, key: str, text: str, step: Any, timestamp: Any, created_at: Any) -> None:
        if step is not None:
            step = coerce_step(key, step)
        when = timestamp if timestamp is not None else created_at
        if isinstance(self._buf, _ClosedBuffer):
            self._buf.extend((kid, 0.0, step, None))  # counted and reported as late
            return
        self._channel.texts.append([kid, text, step, None if when is None else coerce_time(key, when)])

    # --- parameters and messages ----------------------------------------------------
    def log_parameter(self, key: str, value: Any) -> None:
        self.log_parameters({key: value})

    def log_parameters(self, params: dict[str, Any]) -> None:
        """Merge parameters into the run's config.yaml (later values for a key win)."""
        self._channel.post("params", check_params(params))

    def log_message(self, text: str, level: str = "info") -> None:
        """Append a line to the run's run.log."""
        level = str(level).lower()
        if level == "warn":
            level = "warning"
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        self._channel.post("log", [time.time(), level, check_log_text(text)])

    def info(self, text: str) -> None:
        self.log_message(text, "info")

    def warn(self, text: str) -> None:
        self.log_message(text, "warning")

    warning = warn

    def error(self, text: str) -> None:
        self.log_message(text, "error")

    # --- artifacts (the hand-over is in expman/_rank/artifacts.py, storage in collector/_artifacts.py) ---
    def log_artifact(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Store the file's content as it is now under `name` (default: the file's name).

        Returns the normalized name at once; the content travels in the background, and
        later changes to the file do not alter it (docs/storage.md, "Snapshots"). Raises
        ArtifactNameError for names like '/abs', '../x' or ones with NUL bytes.
        """
        from expman._rank.logged_files import log_file

        return log_file(self._channel, self._sender, path, name)

    def log_artifacts(
        self, directory: str | os.PathLike[str], prefix: str | None = None, *, follow_symlinks: bool = False
    ) -> list[str]:
        """Store every file under `directory` as `prefix/<relative path>`; returns the names.

        Symlinks that point outside the folder are skipped with a warning (also written to
        run.log) unless `follow_symlinks=True`; linked folders are never descended.
        """
        from expman._rank.logged_files import log_directory

        return log_directory(self._channel, self._sender, directory, prefix, follow_symlinks)

    # --- media (expman/_rank/media.py: copy and queue; the collector encodes) -------------
    def log_image(self, key: str, image: Any, step: int | None = None, caption: str | None = None) -> None:
        """An image: numpy HxW / HxWx1|3|4 (uint8, or float in [0, 1]), a PIL image, a CHW
        torch tensor, or a path to an image file. Copies the pixels and returns; the
        collector writes the PNG. Read back with `run.read_media(key, step)`."""
        from expman._rank import media

        media.log_image(self._channel, self._sender, key, image, step, caption)

    def log_histogram(self, key: str, values: Any = None, step: int | None = None, bins: int = 64, *,
                      edges: Any = None, counts: Any = None) -> None:
        """A histogram of `values` (binned by the collector into `bins` equal bins over their
        finite range), or given `edges=` and `counts=`."""
        from expman._rank import media

        media.log_histogram(self._channel, self._sender, key, values, step, bins, edges=edges, counts=counts)

    def log_table(self, key: str, data: Any, step: int | None = None) -> None:
        """A table (Arrow table, pandas or polars frame, list of dicts), stored as Parquet."""
        from expman._rank import media

        media.log_table(self._channel, self._sender, key, data, step)

    def log_audio(self, key: str, samples: Any, sample_rate: int, step: int | None = None) -> None:
        """Audio samples, shape (n,) or (n, channels), int16 or float; stored as WAV."""
        from expman._rank import media

        media.log_audio(self._channel, self._sender, key, samples, sample_rate, step)

    def log_video(self, key: str, frames_or_path: Any, fps: float = 4, step: int | None = None) -> None:
        """Frames (T x H x W[x C] numpy, T x C x H x W torch; uint8 or floats in [0, 1]),
        stored as an animated PNG (lossless), or a video file (GIF, MP4, ...) as it is."""
        from expman._rank import media

        media.log_video(self._channel, self._sender, key, frames_or_path, fps, step)

    def log_figure(self, name: str, figure: Any, step: int | None = None, **savefig_kwargs: Any) -> None:
        """A matplotlib figure, rendered to PNG on this thread and stored as image `name`."""
        from expman._rank import media

        media.log_figure(self._channel, self._sender, name, figure, step, **savefig_kwargs)

    def log_figure_from_path(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """An image file already on disk (a saved figure), stored as image `name`
        (default: `figures/<file name>`)."""
        from expman._rank import media

        media.log_image(self._channel, self._sender, name or f"figures/{os.path.basename(os.fspath(path))}", path)

    # --- runs ---------------------------------------------------------------------------
    def start_experiment(self, name: str | None = None, **kwargs: Any) -> Experiment:
        """Start a child run in the same experiment, linked both ways in run.yaml."""
        kwargs.setdefault("root", self.root)
        kwargs.setdefault("collector", self._sender.endpoint)
        child = self._start_child(self.experiment, name, _parent=self, **kwargs)
        self._children.append(child)
        return child

    def child_run_id(self, name: str | None) -> str:
        """The id of this run's next child called `name`: the same in every rank, since
        every rank starts its children in the same order."""
        count = self._child_names[name] = self._child_names.get(name, 0) + 1
        return hashlib.sha256(f"{self.uid}/{name}/{count}".encode()).hexdigest()[:12]

    @property
    def run_dir(self) -> Path:
        """The run's folder, as the collector that writes it names it.

        In local mode it is known at once. With a separate collector (a service, a relay
        head, `EXPMAN_COLLECTOR`) whose root may differ from this process's, it is the
        collector's answer to the run's first frame: read before that answer, this waits
        for it up to RUN_DIR_WAIT_S (10 s) and raises ExpmanError if the collector has not
        answered, rather than guess a path that may never exist. Behind a relay it is the
        folder on the head collector's host.
        """
        channel = self._channel
        if not channel.run_dir_known.wait(RUN_DIR_WAIT_S):
            raise ExpmanError(
                f"run {self.uid}: the collector at {self._sender.endpoint} has not answered within "
                f"{RUN_DIR_WAIT_S:g} s, so the run's folder is not known yet (is the collector running?)"
            )
        return channel.run_dir  # type: ignore[return-value]

    def stats(self) -> dict[str, int]:
        """Delivery counters: points sent, acknowledged (persisted), still buffered, dropped."""
        return self._sender.stats_for(self._channel)

    def finish(self, status: str = "finished", timeout: float | None = None, *, error: dict | None = None) -> bool:
        """Flush everything and wait (bounded) until the collector has persisted it.

        Returns True when the collector confirmed every frame, False on timeout.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {sorted(FINAL_STATUSES)}, got {status!r}")
        channel = self._channel
        if channel.inherited_by_fork:  # the parent process delivers and finishes this run
            log.warning("expman: %s; finish() here does nothing", channel.why_closed())
            return False
        if channel.finish_request is None:
            for child in self._children:
                if child._channel.finish_request is None:
                    child.finish(status, timeout)
            console.detach(channel)
            self._buf = _ClosedBuffer(channel)
            self._ring = NoRing()
            self.status = status
            channel.finish_request = {"status": status, "ended_at": time.time(), "error": error}
            self._sender.wake()
        done = channel.finished.wait(self.finish_timeout if timeout is None else timeout)
        if not done:
            s = self.stats()
            log.error(
                "expman: run %s: the collector did not confirm within the timeout; "
                "%d points may be missing (sent %d, acknowledged %d)",
                self.uid, s["buffered"], s["sent"], s["acked"],
            )
            hint = None if self._sender.heard_from_collector else curve_refusal_hint(self._sender.endpoint)
            if hint:
                log.error("expman: run %s: nothing was ever acknowledged; %s", self.uid, hint)
        self._sender.unregister(channel)
        if done:  # every point stored: nothing left to recover
            channel.forget_ring()
        return done

    def _inherited_by_fork(self) -> None:
        """In a forked child: this run belongs to the parent, whose sender thread the child
        does not have. Points and messages are dropped with one warning; finish() returns
        False at once (expman/_rank/start.py registers this at fork)."""
        self._channel.inherited_by_fork = True
        self._buf = _ClosedBuffer(self._channel)
        self._ring = NoRing()  # the parent's mapping: never write it
        self._channel.ring = None

    @property
    def finishing(self) -> bool:
        """Whether finish() has been called (the run may still be flushing)."""
        return self._channel.finish_request is not None

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.finish("finished")
        elif isinstance(exc, KeyboardInterrupt):
            self.finish("killed", error=describe_exception(exc))
        else:
            self.finish("failed", error=describe_exception(exc))

    def _repr_html_(self) -> str:
        """A notebook's view: the run's summary as the collector has written it so far."""
        from expman._errors import RunNotFoundError
        from expman._reader.notebook import pending_html, run_html
        from expman._reader.run import Run

        try:
            return run_html(Run(self.run_dir))
        except RunNotFoundError:
            return pending_html(f"{self.experiment}/{self.name}")

    def __repr__(self) -> str:
        return f"<expman.Experiment {self.experiment}/{self.name} uid={self.uid} rank={self.rank} status={self.status}>"


def fits_float64(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def describe_exception(exc: BaseException) -> dict[str, str]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-20000:],
    }
