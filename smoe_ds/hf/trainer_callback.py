"""SMoE-Dropout inside a Hugging Face ``Trainer`` script: k from the schedule at every step, k in
Trainer's logs, and evaluation at several k through Trainer's own evaluation loop.

    model = AutoModelForSequenceClassification.from_pretrained(path)
    convert_model(model, num_experts=8)                                      # SMoE-Dropout, line 1
    trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=...)
    SMoEDropoutCallback(KScheduleConfig(k_min=4, k_max=8), eval_ks=[2, 8]).install(trainer)  # line 2
    trainer.train()

k is a pure function of ``state.global_step`` (``smoe_ds.moe.schedule``), set before every
optimizer step, so a run resumed with ``resume_from_checkpoint`` runs each step at the k an
uninterrupted run would: nothing about k is checkpointed. Each training log gets ``k``, the k its
last step ran at. With ``eval_ks``, every evaluation Trainer runs (``eval_strategy``, or
``trainer.evaluate()``) is followed by one ``trainer.evaluate`` per k in ``eval_ks``, whose metrics
are named ``eval_k{k}_...`` (``eval_k2_accuracy``) and logged like Trainer's own; the training k is
restored afterwards.

Under Trainer's DeepSpeed integration the model is readied for ``deepspeed.initialize`` when the
Trainer is built, and ``install`` also checks the optimizer's groups (``smoe_ds.hf.trainer_deepspeed``:
every ZeRO stage, and expert parallelism with ``convert_for_trainer`` and ``optimizer_cls_and_kwargs``).

``install`` puts the callback first among the trainer's callbacks: Trainer hands one ``logs`` dict
to its callbacks in order, and the reporters of ``report_to`` (TensorBoard, ...) and the printer
come before a callback passed as ``Trainer(callbacks=[...])``, so only from the front does ``k``
reach them. Passed that way instead, the callback still sets k and refuses what it cannot run, and
k reaches ``state.log_history`` (``trainer_state.json``); evaluating at several k (the callback
must call ``trainer.evaluate``) and saving an expert-parallel model (``save_model`` must gather the
experts first) need ``install``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from transformers import TrainerCallback

from smoe_ds.config.schema import ConfigError, KScheduleConfig, check_k_schedule
from smoe_ds.distributed import faults
from smoe_ds.hf.surgery import active_experts, spec_of
from smoe_ds.hf.trainer_deepspeed import (
    check_expert_ranks,
    model_ep_size,
    optimizer_groups_of,
    ready_for_trainer,
    save_model_gathering_experts,
)
from smoe_ds.moe.layer import set_active_experts
from smoe_ds.moe.schedule import k_at_step

INSTALL = "call callback.install(trainer) instead of callbacks=[...]"
SCHEDULE_NAME = "schedule"  # how the refusals name the callback's schedule (its keys: schedule.k_max, ...)


def as_schedule(schedule: KScheduleConfig | Mapping | None) -> KScheduleConfig:
    """A ``KScheduleConfig``, or a mapping of its keys (a config's ``moe.k_schedule`` section)."""
    if schedule is None:
        return KScheduleConfig()
    if isinstance(schedule, KScheduleConfig):
        return dataclasses.replace(schedule)
    known = {f.name for f in dataclasses.fields(KScheduleConfig)}
    unknown = sorted(set(schedule) - known)
    if unknown:
        raise ConfigError(f"unknown k schedule key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return KScheduleConfig(**schedule)


def resolved_schedule(schedule: KScheduleConfig, num_experts: int, max_steps: int | None) -> KScheduleConfig:
    """``schedule`` with the trainer's defaults filled (k N/2 -> N over the run's ``max_steps``) and checked
    against ``num_experts``; ConfigError naming the key otherwise."""
    n = num_experts
    filled = dataclasses.replace(
        schedule,
        k_min=max(1, n // 2) if schedule.k_min is None else schedule.k_min,
        k_max=n if schedule.k_max is None else schedule.k_max,
        end_step=(max_steps or 0) if schedule.end_step is None else schedule.end_step,
    )
    check_k_schedule(filled, n, SCHEDULE_NAME)
    return filled


class SMoEDropoutCallback(TrainerCallback):
    """Sets every SMoE-Dropout layer's k from ``schedule`` before each step of a Trainer run.

    ``schedule``: a ``KScheduleConfig`` or a mapping of its keys; unset keys take the trainer's
    defaults (k_min N/2, k_max N, end_step the run's max_steps). ``eval_ks``: the k to evaluate at
    after each of Trainer's evaluations (needs ``install``). The model must be converted
    (``smoe_ds.hf.convert_model``) before the Trainer is built; the refusals are one-line
    ``ConfigError``s, raised when the Trainer is built or ``install`` is called.
    """

    def __init__(self, schedule: KScheduleConfig | Mapping | None = None, eval_ks: Iterable[int] = ()) -> None:
        self.schedule = as_schedule(schedule)
        self.eval_ks = list(eval_ks)
        self.trainer = None
        self._num_experts: int | None = None
        self._resolved: KScheduleConfig | None = None
        self._sweeping = False  # inside our own per-k evaluations

    # -- checks ----------------------------------------------------------------------------

    def check_model(self, model, max_steps: int | None = None) -> None:
        """ConfigError unless ``model`` is converted and the schedule and ``eval_ks`` fit its N."""
        n = spec_of(model).num_experts
        self._resolved = resolved_schedule(self.schedule, n, max_steps)
        bad = [k for k in self.eval_ks if not (isinstance(k, int) and 1 <= k <= n)]
        if bad:
            raise ConfigError(f"eval_ks must be in [1, num_experts={n}], got {bad}")
        self._num_experts = n

    def install(self, trainer) -> SMoEDropoutCallback:
        """Check ``trainer.model``, then join ``trainer``'s callbacks first (see the module's docstring)."""
        self.check_model(trainer.model, trainer.args.max_steps if trainer.args.max_steps > 0 else None)
        ready_for_trainer(trainer.model, trainer.args, optimizer_groups_of(trainer))
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        self.trainer = trainer
        save_model_gathering_experts(trainer)  # expert parallelism: save_model gathers the experts
        return self

    def k_at(self, step: int) -> int:
        """k of the 0-based optimizer step ``step`` (run after ``step`` steps are done)."""
        if self._resolved is None:
            raise RuntimeError("the callback has not seen its model yet (on_init_end, install or on_train_begin)")
        return k_at_step(self._resolved, step)

    # -- Trainer events -------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.check_model(model, args.max_steps if args.max_steps > 0 else None)
        ready_for_trainer(model, args)  # before train() calls deepspeed.initialize; install checks the optimizer too

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # state.max_steps is known now (from max_steps or the epochs); it ends a schedule left open
        self.check_model(model, state.max_steps)
        if args.deepspeed:
            check_expert_ranks(model, args.process_index)  # the engine exists now, and its expert groups
        if self.trainer is None:
            if self.eval_ks:
                raise ConfigError(f"eval_ks needs the trainer: {INSTALL}")
            if model_ep_size(model) > 1:  # before a checkpoint would fail on rank 0's half of the experts
                raise ConfigError(f"saving an expert-parallel model needs the trainer: {INSTALL}")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        faults.maybe_die("train", args.process_index, state.global_step)  # tests' kill:RANK:train:STEP
        set_active_experts(model, self.k_at(state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or state.global_step < 1:
            return  # not a training log (evaluations have their own names)
        k = self.k_at(state.global_step - 1)  # the last step's
        logs["k"] = k
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last["k"] = k  # Trainer appended a copy of logs to the history before calling us

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.eval_ks or self._sweeping:
            return
        if self.trainer is None:
            raise ConfigError(f"eval_ks needs the trainer: {INSTALL}")
        training_k = active_experts(model)
        self._sweeping = True
        try:
            for k in self.eval_ks:
                set_active_experts(model, k)
                self.trainer.evaluate(metric_key_prefix=f"eval_k{k}")
        finally:
            self._sweeping = False
            set_active_experts(model, training_k)
