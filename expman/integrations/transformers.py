"""Hugging Face Transformers: `ExpmanCallback`, a `TrainerCallback` that writes into an expman run.

    from expman.integrations.transformers import ExpmanCallback
    trainer = Trainer(model, args, ..., callbacks=[ExpmanCallback("glue", "bert-tiny")])

`TrainingArguments` (and the model's config) become parameters, every `on_log` becomes
points at `state.global_step`, and `on_train_end` finishes the run. Every rank logs
(expman keeps the ranks apart); ranks agree on the run id as
expman/integrations/_run_ids.py says.

Transformers has no hook for a failed `train()`: an uncaught exception marks the run
failed through expman's exit hooks (KeyboardInterrupt and SIGTERM: killed), and a run
whose training never reached `on_train_end` is finished as failed when the process exits.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        "expman.integrations.transformers needs Hugging Face Transformers: pip install 'expman[transformers]'"
    ) from exc

from expman import Experiment, start_experiment
from ._params import to_param, to_params
from ._run_ids import adapter_run_id

_logger = logging.getLogger("expman")

UNFINISHED_ERROR = {
    "type": "TrainingNotFinished",
    "message": "the process ended inside Trainer.train(): on_train_end never came (an exception was caught?)",
    "traceback": "",
}


class ExpmanCallback(TrainerCallback):
    """Logs a Trainer's arguments, model config and logs into one expman run.

    `space` is the experiment and `name` the run's name (default: `args.run_name` when
    it is a valid run name, else expman's default). Other keywords go to
    `expman.start_experiment` (`root=`, `collector=`, `tags=`, `run_id=`, ...); rank
    and world size default to the Trainer's (`args.process_index`, `args.world_size`).
    `log_model_config=False` leaves the model's config out of the parameters.
    """

    def __init__(
        self,
        space: str | None = None,
        name: str | None = None,
        *,
        log_model_config: bool = True,
        **start_kwargs: Any,
    ) -> None:
        self._space = space
        self._name = name
        self._log_model_config = log_model_config
        self._run_id = adapter_run_id(start_kwargs.pop("run_id", None))
        self._start_kwargs = start_kwargs
        self._exp: Experiment | None = None
        self._training = False
        self._warned: set[str] = set()

    @property
    def experiment(self) -> Experiment | None:
        """The run's `expman.Experiment` in this process, once training (or logging) began."""
        return self._exp

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._ensure_run(args, model)
        self._training = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               model: Any = None, **kwargs: Any) -> None:
        """Each value at `state.global_step`; a value that is not a number or text is skipped
        with one warning per key (training goes on)."""
        self._log_values(args, state, model, logs)

    def on_predict(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                   model: Any = None, **kwargs: Any) -> None:
        """trainer.predict()'s metrics (`test_*`), which never reach on_log."""
        self._log_values(args, state, model, metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False
        if self._exp is not None:
            self._exp.finish("finished")

    # --- plumbing ------------------------------------------------------------------------------
    def _log_values(self, args: Any, state: Any, model: Any, values: dict[str, Any] | None) -> None:
        exp = self._ensure_run(args, model)
        for key, value in (values or {}).items():
            try:
                exp.log_metric(key, value, step=state.global_step)
            except (TypeError, ValueError) as exc:
                if key not in self._warned:
                    self._warned.add(key)
                    _logger.warning("expman: not logging %r: %s", key, exc)

    def _ensure_run(self, args: Any, model: Any) -> Experiment:
        """Start the run on first use; reopen it when something is logged after it finished
        (trainer.evaluate() after train())."""
        exp = self._exp
        if exp is not None and exp.status == "running":
            return exp
        kwargs = dict(self._start_kwargs)
        kwargs.setdefault("rank", getattr(args, "process_index", None))
        kwargs.setdefault("world_size", getattr(args, "world_size", None))
        if exp is not None:
            kwargs.update(experiment_uid=self._run_id, code_dir=False)
        name = self._name if self._name is not None else _valid_name(getattr(args, "run_name", None))
        new = self._exp = start_experiment(self._space, name, run_id=self._run_id, **kwargs)
        if exp is None:
            new.log_parameters(self._parameters(args, model))
            atexit.register(self._at_exit)  # after expman's own hook, so it runs before it
        return new

    def _parameters(self, args: Any, model: Any) -> dict[str, Any]:
        params = to_params(args.to_dict() if hasattr(args, "to_dict") else args)
        config = getattr(model, "config", None)
        if self._log_model_config and config is not None and hasattr(config, "to_dict"):
            params["model_config"] = to_param(config.to_dict())
        return params

    def _at_exit(self) -> None:
        exp = self._exp
        if self._training and exp is not None and exp.status == "running":
            exp.finish("failed", error=UNFINISHED_ERROR)


def _valid_name(name: Any) -> str | None:
    from expman._wire.limits import check_name

    if not isinstance(name, str) or not name:
        return None
    try:
        return check_name("run", name)
    except (TypeError, ValueError):
        return None
