"""Typed run configuration: one JSON file, strict loading, ``--set`` overrides.

A config file is a DeepSpeed config with four extra top-level sections that belong to
smoe-ds: ``model``, ``moe``, ``data`` and ``run``. Those four are loaded into the
dataclasses below; an unknown key anywhere in them is an error that names the key.
Everything else is the DeepSpeed section and is handed to ``deepspeed.initialize``
untouched, except that ``"auto"`` in ``scheduler.params.total_num_steps`` is replaced by
``run.max_steps`` (the same convention as the transformers DeepSpeed integration).

DeepSpeed silently ignores what it does not read, so the DeepSpeed section is checked against the
installed DeepSpeed (``smoe_ds.config.deepspeed_keys``) when the config loads: every top-level key is one
of our sections or a key DeepSpeed reads, the sections DeepSpeed validates with pydantic are
built by its own models, and ``optimizer.type`` / ``scheduler.type`` name something it builds.

Semantic checks that need the world size (ep_size against ranks, batch sizes) live in
``validate_for_world``; everything else is checked by ``TrainConfig.validate``. Both raise
``ConfigError`` with a single line that names the offending key.
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import difflib
import importlib
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

OUR_SECTIONS = ("model", "moe", "data", "run")
AUTOTUNING_END_PROFILE_STEP_DEFAULT = 5  # deepspeed.autotuning.constants' (not imported: it loads DeepSpeed)
OBJECTIVES = ("causal_lm", "masked_lm")
MOE_MODES = ("smoe_dropout", "dense", "learned", "random_fixed", "thor")
FULL_ROUTE_DISPATCH = ("all_to_all", "gather_scatter", "counted")
# What expert parallelism moves between the ranks of a group: the tokens to the experts
# (smoe_ds.moe.dispatch's dispatch and combine) or the experts' weights to the tokens (its gather_experts).
EP_EXCHANGES = ("tokens", "weights")
SCHEDULE_KINDS = ("linear", "cosine", "exponential", "multistep")
# Every command's config class ("module:class", imported only to explain a refused key): a section of
# one command's config given to another is refused with the name of the command it belongs to.
COMMAND_CONFIGS = {
    "smoe_ds.train": "smoe_ds.config.schema:TrainConfig",
    "smoe_ds.finetune": "smoe_ds.finetuning.config:FinetuneConfig",
}


class ConfigError(ValueError):
    """A problem in the user's config or command line; its message is one line."""


@dataclass
class ModelConfig:
    """The built-in language model: a decoder, or (objective masked_lm) a bidirectional encoder."""

    vocab_size: int = 256  # bytes; replaced by the tokenizer's size when data.tokenizer is set
    d_model: int = 128  # width of the residual stream (token embeddings and every block's input and output)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads per block; d_model must divide by it
    block_size: int = 128  # tokens per training sequence
    positions: str = "rope"  # "rope" or "learned"
    dropout: float = 0.0  # in training: dropout on the embeddings, the attention weights and each block's branches
    # Which transformer blocks get the (S)MoE FFN: "all", "every_other" (1, 3, 5, ...) or a list of indices.
    moe_layers: Any = "all"
    init_seed: int = 0  # every weight is a pure function of this seed and its name, whatever the world size
    # "causal_lm": the decoder, trained on the next token. "masked_lm": a bidirectional encoder trained
    # with BERT's masking (smoe_ds.masking), which needs data.tokenizer with a mask token (a WordPiece/BPE one).
    objective: str = "causal_lm"

    def moe_layer_indices(self) -> list[int]:
        if self.moe_layers == "all":
            return list(range(self.n_layers))
        if self.moe_layers == "every_other":
            return list(range(1, self.n_layers, 2))
        if isinstance(self.moe_layers, list) and all(isinstance(i, int) for i in self.moe_layers):
            return sorted(set(self.moe_layers))
        raise ConfigError(f"model.moe_layers must be 'all', 'every_other' or a list of ints, got {self.moe_layers!r}")


@dataclass
class KScheduleConfig:
    """How many experts are active at each global step (see ``smoe_ds.moe.schedule``)."""

    kind: str = "linear"  # "linear", "cosine", "exponential" or "multistep" (smoe_ds.moe.schedule)
    k_min: int | None = None  # default: N // 2, as in the paper's 8 -> 16 of 16
    k_max: int | None = None  # default: N, so training ends at full capacity
    start_step: int = 0  # k grows from k_min at this step (multistep: its default milestones start here)
    end_step: int | None = None  # default: run.max_steps
    milestones: list = field(default_factory=list)  # multistep only; default: evenly spaced


@dataclass
class MoEConfig:
    mode: str = "smoe_dropout"  # "smoe_dropout", "dense", "learned", "random_fixed" or "thor"
    num_experts: int = 16  # N
    d_expert: int = 64  # hidden width of one expert; the dense baseline uses d_ff = N * d_expert
    ep_size: int = 1  # expert-parallel ranks per group; N and the world size must divide by it
    router_seed: int = 1234  # the frozen router of layer L is drawn from (router_seed, L)
    # Std of the frozen router's weights; null = 1/sqrt(d_model). The paper's code uses 0.02 (its
    # init for every Linear), which makes the softmax over the selected logits flatter.
    router_init_std: float | None = None
    capacity_factor: float | None = None  # None = dropless; else C = ceil(cf * k * S / N)
    # How tokens travel when every one goes to every expert-parallel rank (k > N - N/ep_size in
    # training): "all_to_all" or "gather_scatter" (smoe_ds.moe.dispatch), or "counted" to always
    # count and route each token as at small k.
    full_route_dispatch: str = "all_to_all"
    # What travels between expert-parallel ranks: "tokens" to the experts (dispatch and combine),
    # or the experts' "weights" to the tokens (one all-gather forward, one reduce-scatter
    # backward per layer; smoe_ds.moe.dispatch says when each is cheaper).
    ep_exchange: str = "weights"
    k_schedule: KScheduleConfig = field(default_factory=KScheduleConfig)  # k at each step, "smoe_dropout" only
    k: int = 2  # fixed k of the "learned" baseline and the "random_fixed" ablation
    aux_loss_coef: float = 0.01  # balance-loss weight of the "learned" baseline
    thor_alpha: float = 1.0  # "thor": weight of the symmetric-KL consistency loss between its two passes

    def export_k(self) -> int:
        """The k an export runs at unless told otherwise: the learned router's fixed k (it was never
        trained at any other), else every expert."""
        return self.k if self.mode == "learned" else self.num_experts


@dataclass
class DataConfig:
    # None: the embedded default corpus, the Python standard library's source.
    # Otherwise a local text file, a folder of text files, or a Hugging Face hub dataset name.
    path: str | None = None
    hub_config: str | None = None  # the dataset's config name, for hub datasets
    text_column: str = "text"  # the column holding the text in hub datasets and single .json/.jsonl/.csv/.parquet files
    val_fraction: float = 0.05  # share of documents (files, or paragraphs of a single file) held out
    tokenizer: str | None = None  # local path of a Hugging Face tokenizer; None = UTF-8 bytes
    seed: int = 0  # shuffling of the training blocks and the train/validation split


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # the run's folder: config.json, checkpoints/, self_slimming.json, train_summary.json
    max_steps: int = 200  # optimizer steps
    seed: int = 0  # torch RNG for dropout and anything stochastic in training
    log_interval: int = 10  # steps between training-loss lines (each the mean loss since the last)
    eval_interval: int = 50  # 0 disables periodic validation
    eval_batches: int = 8  # validation micro-batches per rank
    final_eval_batches: int = 16  # per rank, for the self-slimming table at the end
    eval_ks: list | None = None  # default: 1, 2, 4, ..., N
    save_checkpoint: bool = True  # save a DeepSpeed checkpoint in out_dir/checkpoints at the end
    save_interval: int = 0  # also save every this many steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept in out_dir/checkpoints (0: all)
    resume: bool = True  # continue from the newest complete checkpoint in out_dir/checkpoints, if any
    master_port: int = 29500  # used only for MPI discovery under mpirun
    collective_timeout_s: float = 600.0  # a collective that waits longer than this fails instead of hanging
    dead_rank_timeout_s: float = 120.0  # a rank silent this long is declared dead and every rank exits
    heartbeat_interval_s: float = 2.0  # how often each rank tells the others it is alive
    max_bad_steps: int = 3  # consecutive steps with a NaN/inf loss (fp32, bf16) before the run stops
    step_breakdown: bool = False  # time each phase of a step and its collectives (smoe_ds.training.step_breakdown)
    heap_trim_interval: int = 5  # CPU runs: steps between heap-trim checks (smoe_ds.training.heap; 0: never)


@dataclass
class TrainConfig:
    SECTIONS: ClassVar[tuple[str, ...]] = OUR_SECTIONS  # the top-level keys that are ours, not DeepSpeed's
    # Keys of the shared sections that this command does not read ("section.key" -> why), refused
    # when a config sets them rather than ignored: see the fine-tuner's.
    UNUSED_KEYS: ClassVar[dict[str, str]] = {}
    COMMAND: ClassVar[str] = "smoe-train"  # the command this config is for, named in messages

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: dict = field(default_factory=dict)

    # -- derived values ---------------------------------------------------------------

    @property
    def uses_moe(self) -> bool:
        return self.moe.mode != "dense"

    @property
    def expert_parallel_size(self) -> int:
        """moe.ep_size where there are experts to shard; 1 for the dense model (nothing is sharded)."""
        return self.moe.ep_size if self.uses_moe else 1

    def default_eval_ks(self) -> list[int]:
        n = self.moe.num_experts
        ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
        return ks + [n]

    def resolve(self) -> "TrainConfig":
        """Fill the defaults that depend on other keys, then validate. Returns self."""
        n = self.moe.num_experts
        ks = self.moe.k_schedule
        if ks.k_min is None:
            ks.k_min = max(1, n // 2)
        if ks.k_max is None:
            ks.k_max = n
        if ks.end_step is None:
            ks.end_step = self.run.max_steps
        if self.run.eval_ks is None:
            self.run.eval_ks = self.default_eval_ks() if self.slimmable else [self.fixed_k()]
        sched = self.deepspeed.get("scheduler")
        sched = sched.get("params") if isinstance(sched, dict) else None  # a malformed one is refused in validate
        if isinstance(sched, dict) and sched.get("total_num_steps") == "auto":
            sched["total_num_steps"] = self.run.max_steps
        self._as_autotuning_experiment()
        for monitor in ("csv_monitor", "tensorboard"):  # monitors write under run.out_dir unless told otherwise
            section = self.deepspeed.get(monitor)
            if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
                section["output_path"] = str(Path(self.run.out_dir) / "monitor")
                section.setdefault("job_name", Path(self.run.out_dir).name)
        self.validate()
        return self

    def _as_autotuning_experiment(self) -> None:
        """One experiment of DeepSpeed's autotuner: its config has ``autotuning.metric_path`` (or, for
        the profiling run, ``model_info_path``) set by the tuner, and the engine writes the metric there
        after ``end_profile_step`` and exits. Such a run gets its own folder beside that file, starts
        fresh and saves nothing: experiments would otherwise resume each other's checkpoints and
        report the metric of a run that trained no step (docs/results/autotuning_cpu)."""
        tuning = self.deepspeed.get("autotuning")
        if not (isinstance(tuning, dict) and tuning.get("enabled")):
            return
        written = tuning.get("metric_path") or tuning.get("model_info_path")
        if written:
            self.run.out_dir = str(Path(written).parent / "smoe_run")
            self.run.resume, self.run.save_checkpoint, self.run.save_interval = False, False, 0
            self.run.eval_interval = 0
        end = tuning.get("end_profile_step", AUTOTUNING_END_PROFILE_STEP_DEFAULT)
        _require(
            self.run.max_steps > end,
            f"autotuning.end_profile_step is {end}: run.max_steps ({self.run.max_steps}) must be larger, "
            "or the engine never writes the metric and the tuner ranks the experiment 0",
        )

    def precision_enabled(self, kind: str) -> bool:
        """Whether the DeepSpeed section turns on ``kind`` ("fp16" or "bf16")."""
        return bool(self.deepspeed.get(kind, {}).get("enabled", False))

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def slimmable(self) -> bool:
        """Modes whose router needs no training, so one checkpoint can be evaluated at any k."""
        return self.moe.mode in ("smoe_dropout", "random_fixed", "thor")

    def fixed_k(self) -> int:
        """k of the modes without a schedule: moe.k for learned and random_fixed, 1 for thor, N for dense."""
        if self.moe.mode == "thor":
            return 1  # THOR sends each token to one random expert
        return self.moe.k if self.moe.mode in ("learned", "random_fixed") else self.moe.num_experts

    # -- checks -----------------------------------------------------------------------

    def validate(self) -> None:
        """Checks that need no process group. Raises ConfigError naming the key."""
        m, moe, ks, run = self.model, self.moe, self.moe.k_schedule, self.run
        _require(m.d_model > 0 and m.n_layers > 0 and m.block_size > 1, "model sizes must be positive")
        _require(
            m.d_model % m.n_heads == 0, f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})"
        )
        _require(
            m.positions in ("rope", "learned"), f"model.positions must be 'rope' or 'learned', got {m.positions!r}"
        )
        if m.positions == "rope":
            _require((m.d_model // m.n_heads) % 2 == 0, "model: rotary positions need an even head size")
        _require(
            m.objective in OBJECTIVES, f"model.objective must be one of {', '.join(OBJECTIVES)}, got {m.objective!r}"
        )
        bad = [i for i in m.moe_layer_indices() if not 0 <= i < m.n_layers]
        _require(not bad, f"model.moe_layers has indices outside [0, {m.n_layers}): {bad}")
        _require(moe.mode in MOE_MODES, f"moe.mode must be one of {', '.join(MOE_MODES)}, got {moe.mode!r}")
        _require(moe.num_experts >= 1 and moe.d_expert >= 1, "moe.num_experts and moe.d_expert must be >= 1")
        _require(moe.ep_size >= 1, f"moe.ep_size must be >= 1, got {moe.ep_size}")
        _require(
            moe.full_route_dispatch in FULL_ROUTE_DISPATCH,
            f"moe.full_route_dispatch must be one of {', '.join(FULL_ROUTE_DISPATCH)}, got {moe.full_route_dispatch!r}",
        )
        _require(
            moe.ep_exchange in EP_EXCHANGES,
            f"moe.ep_exchange must be one of {', '.join(EP_EXCHANGES)}, got {moe.ep_exchange!r}",
        )
        _require(
            moe.router_init_std is None or moe.router_init_std > 0,
            f"moe.router_init_std must be positive or null (1/sqrt(d_model)), got {moe.router_init_std}",
        )
        _require(
            moe.num_experts % moe.ep_size == 0,
            f"moe.num_experts ({moe.num_experts}) is not divisible by moe.ep_size ({moe.ep_size})",
        )
        _require(
            moe.capacity_factor is None or moe.capacity_factor > 0,
            f"moe.capacity_factor must be positive or null (dropless), got {moe.capacity_factor}",
        )
        n = moe.num_experts
        check_k_schedule(ks, n)
        _require(1 <= moe.k <= n, f"moe.k ({moe.k}) must be in [1, num_experts={n}]")
        _require(run.max_steps >= 1, f"run.max_steps must be >= 1, got {run.max_steps}")
        _require(
            run.log_interval >= 1 and run.eval_batches >= 1 and run.final_eval_batches >= 1,
            "run.log_interval, run.eval_batches and run.final_eval_batches must be >= 1",
        )
        _require(run.save_interval >= 0 and run.keep_last >= 0, "run.save_interval and run.keep_last must be >= 0")
        _require(run.collective_timeout_s > 0, "run.collective_timeout_s must be positive")
        _require(
            0 < run.heartbeat_interval_s * 3 <= run.dead_rank_timeout_s,
            "run.dead_rank_timeout_s must be at least 3 x run.heartbeat_interval_s (both positive)",
        )
        _require(run.max_bad_steps >= 1, f"run.max_bad_steps must be >= 1, got {run.max_bad_steps}")
        _require(run.eval_interval >= 0, "run.eval_interval must be >= 0 (0 disables it)")
        _require(run.heap_trim_interval >= 0, "run.heap_trim_interval must be >= 0 (0 disables it)")
        bad_ks = [k for k in run.eval_ks if not (isinstance(k, int) and 1 <= k <= n)]
        _require(not bad_ks, f"run.eval_ks has values outside [1, num_experts={n}]: {bad_ks}")
        _require(0 < self.data.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        self._validate_deepspeed()

    def _validate_deepspeed(self) -> None:
        ds = self.deepspeed
        self._check_against_deepspeed()
        lr = ds["optimizer"].get("params", {}).get("lr")
        _require(
            lr is None or (isinstance(lr, (int, float)) and lr >= 0), f"optimizer.params.lr must be >= 0, got {lr}"
        )
        _require(
            not (self.precision_enabled("fp16") and self.precision_enabled("bf16")),
            "fp16.enabled and bf16.enabled are both true; choose one",
        )
        zero = ds.get("zero_optimization", {})
        stage = zero.get("stage", 0)  # 0 to 3: DeepSpeed's model of the section has checked it
        if self.moe.mode == "learned" and stage == 3:
            raise ConfigError(
                "zero_optimization.stage 3 does not support moe.mode learned (DeepSpeed's own MoE layer, which "
                "its engine refuses under ZeRO-3); use stage 2, or a mode with the frozen router "
                "(smoe_dropout, random_fixed, thor) or dense"
            )
        if self.uses_moe and stage == 2:
            for key in ("contiguous_gradients", "reduce_scatter"):
                _require(
                    zero.get(key, True) is True, f"zero_optimization.{key} must be true for ZeRO-2 with MoE layers"
                )
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            val = ds.get(key)
            _require(
                val is None or (isinstance(val, int) and val >= 1), f"{key} must be a positive integer, got {val!r}"
            )
        _require(
            "train_micro_batch_size_per_gpu" in ds or "train_batch_size" in ds,
            "set train_micro_batch_size_per_gpu (or train_batch_size) in the config",
        )
        sched_steps = ds.get("scheduler", {}).get("params", {}).get("total_num_steps")
        _require(
            sched_steps is None or isinstance(sched_steps, int),
            f'scheduler.params.total_num_steps must be an int or "auto", got {sched_steps!r}',
        )

    def _check_against_deepspeed(self) -> None:
        """Refuse, in one line, what the installed DeepSpeed would ignore or fail on later: an unknown
        top-level key, a value not of the type of DeepSpeed's default, a field its models refuse or its
        readers never read, an optimizer or scheduler it cannot build or an argument it cannot take."""
        from smoe_ds.config import deepspeed_keys, deepspeed_params

        ds = self.deepspeed
        for key in ds:
            if key not in deepspeed_keys.known_keys():
                raise ConfigError(self._unknown_key(key))
        _require(isinstance(ds.get("optimizer"), dict), 'the config needs a DeepSpeed "optimizer" section')
        _require(
            isinstance(ds["optimizer"].get("params", {}), dict),
            "optimizer.params must be a JSON object (the optimizer's keyword arguments)",
        )
        problem = deepspeed_keys.optimizer_problem(ds["optimizer"].get("type"))
        _require(problem is None, problem)
        problem = deepspeed_params.optimizer_params_problem(ds["optimizer"]["type"], ds["optimizer"].get("params", {}))
        _require(problem is None, problem)
        if "scheduler" in ds:
            _require(isinstance(ds["scheduler"], dict), "scheduler must be a JSON object with a type and params")
            _require(
                isinstance(ds["scheduler"].get("params", {}), dict),
                "scheduler.params must be a JSON object (the scheduler's keyword arguments)",
            )
            problem = deepspeed_keys.scheduler_problem(ds["scheduler"].get("type"))
            _require(problem is None, problem)
            scheduler = ds["scheduler"]
            problem = deepspeed_params.scheduler_params_problem(scheduler["type"], scheduler.get("params", {}))
            _require(problem is None, problem)
        for key, value in ds.items():
            # a value of the wrong type, a field DeepSpeed's models refuse, one its plain readers never read
            for check in (
                deepspeed_keys.top_level_problem,
                deepspeed_keys.section_problem,
                deepspeed_keys.unread_problem,
            ):
                problem = check(key, value)
                _require(problem is None, problem)

    def _unknown_key(self, key: str) -> str:
        """Why top-level ``key`` is refused: DeepSpeed removed it, it is another command's section, or
        DeepSpeed does not read it (with the closest key that is known)."""
        from smoe_ds.config import deepspeed_keys

        reason = deepspeed_keys.removed(key)
        if reason:
            return f"'{key}' is no longer read by DeepSpeed {deepspeed_keys.version()}: {reason}"
        ours = ", ".join(self.SECTIONS)
        for command, where in COMMAND_CONFIGS.items():
            module, name = where.split(":")
            if key in getattr(importlib.import_module(module), name).SECTIONS:
                return f"'{key}' is a section of {command}'s config, not of this one, whose sections are {ours}"
        guess = difflib.get_close_matches(key, sorted(deepspeed_keys.known_keys() | set(self.SECTIONS)), n=1)
        if guess:
            return f"unknown key '{key}' (did you mean '{guess[0]}'?)"
        return (
            f"unknown key '{key}': neither a section of this config ({ours}) nor a key DeepSpeed "
            f"{deepspeed_keys.version()} reads ({deepspeed_keys.DOCS})"
        )

    def validate_for_world(self, world_size: int) -> None:
        """Checks that need the number of ranks."""
        ep = self.moe.ep_size
        if self.uses_moe:
            _require(world_size % ep == 0, f"the world size ({world_size}) is not divisible by moe.ep_size ({ep})")
        ds = self.deepspeed
        tbs, mbs = ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu")
        gas = ds.get("gradient_accumulation_steps")
        if tbs is not None and mbs is not None:
            gas_eff = gas if gas is not None else tbs // (mbs * world_size)
            _require(
                tbs == mbs * gas_eff * world_size,
                f"train_batch_size ({tbs}) != train_micro_batch_size_per_gpu ({mbs}) * "
                f"gradient_accumulation_steps ({gas_eff}) * world size ({world_size}); "
                "fix one of them, or drop train_batch_size to have it computed",
            )
        elif tbs is not None:
            per_micro = (gas or 1) * world_size
            _require(
                tbs % per_micro == 0,
                f"train_batch_size ({tbs}) is not divisible by gradient_accumulation_steps ({gas or 1}) * "
                f"world size ({world_size}); set train_micro_batch_size_per_gpu instead",
            )

    def micro_batch_size(self, world_size: int) -> int:
        ds = self.deepspeed
        if "train_micro_batch_size_per_gpu" in ds:
            return ds["train_micro_batch_size_per_gpu"]
        return ds["train_batch_size"] // (ds.get("gradient_accumulation_steps", 1) * world_size)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step, as DeepSpeed will derive it (after ``validate_for_world``)."""
        ds = self.deepspeed
        if "gradient_accumulation_steps" in ds:
            return ds["gradient_accumulation_steps"]
        if "train_batch_size" in ds and "train_micro_batch_size_per_gpu" in ds:
            return ds["train_batch_size"] // (ds["train_micro_batch_size_per_gpu"] * world_size)
        return 1

    def to_dict(self) -> dict:
        """The whole config as JSON would hold it, loadable again (keys this command does not use left out)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}
        for dotted in self.UNUSED_KEYS:
            section, key = dotted.split(".")
            out[section].pop(key, None)
        out.update(self.deepspeed)
        return out


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_k_schedule(ks: KScheduleConfig, num_experts: int, name: str = "moe.k_schedule") -> None:
    """ConfigError naming the key (``name``.k_max, ...) unless ``ks``, its defaults filled, is a
    schedule of k in [1, ``num_experts``]."""
    n = num_experts
    _require(ks.kind in SCHEDULE_KINDS, f"{name}.kind must be one of {', '.join(SCHEDULE_KINDS)}, got {ks.kind!r}")
    _require(1 <= ks.k_min <= n, f"{name}.k_min ({ks.k_min}) must be in [1, num_experts={n}]")
    _require(1 <= ks.k_max <= n, f"{name}.k_max ({ks.k_max}) must be in [1, num_experts={n}]")
    _require(ks.k_min <= ks.k_max, f"{name}.k_min ({ks.k_min}) is above k_max ({ks.k_max})")
    _require(ks.start_step >= 0, f"{name}.start_step must be >= 0")
    _require(ks.end_step >= ks.start_step, f"{name}.end_step ({ks.end_step}) is before start_step ({ks.start_step})")
    _require(
        all(isinstance(s, int) for s in ks.milestones) and ks.milestones == sorted(ks.milestones),
        f"{name}.milestones must be an increasing list of steps",
    )


# -- loading ------------------------------------------------------------------------------


def load_config(path: str | None, overrides: tuple[str, ...] | list[str] = (), cls: type = TrainConfig) -> TrainConfig:
    """Read ``path`` (a JSON file, or JSON in base64 as DeepSpeed's autotuner passes it), apply
    ``KEY=VALUE`` overrides, build and resolve a ``cls`` config."""
    raw: dict = {}
    if path is not None:
        text, where = _config_text(path)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: the top level must be a JSON object")
    raw = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw, cls).resolve()


def _config_text(path: str) -> tuple[str, str]:
    """The text of the config ``path`` names, and how messages name it. DeepSpeed's autotuner
    replaces the value of ``--deepspeed_config`` with the experiment's config as urlsafe base64
    (``deepspeed/autotuning/scheduler.py``), often too long a name for the file system."""
    try:
        if Path(path).is_file():
            return Path(path).read_text(), path
    except OSError:  # a name too long to be a file's
        pass
    try:
        text = base64.urlsafe_b64decode(path.encode("ascii")).decode("utf-8")
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        text = ""
    if not text.lstrip().startswith("{"):
        raise ConfigError(f"config file not found: {path[:200]}")
    return text, "the base64 config"


def config_cli(
    argv: list[str] | None, prog: str, description: str, cls: type = TrainConfig
) -> Callable[[], TrainConfig]:
    """Parse a CLI's ``--config FILE [--set KEY=VALUE ...]``; returns the loader of the ``cls`` config,
    to be called inside ``run_main`` so that a ConfigError becomes its one-line message."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    sections = "/".join(cls.SECTIONS)
    p.add_argument(
        "--config",
        "--deepspeed_config",  # the flag DeepSpeed's autotuner finds the config by, and rewrites per experiment
        dest="config",
        required=True,
        help=f"JSON file: a DeepSpeed config plus {sections} sections",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key by its dotted path, e.g. run.max_steps=100 (repeatable)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    return lambda: load_config(args.config, args.set, cls=cls)


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict; the value is parsed as JSON, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, text = item.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict, cls: type = TrainConfig) -> TrainConfig:
    """``cls`` (TrainConfig or a subclass with other ``SECTIONS``) from a parsed JSON config."""
    raw = dict(raw)
    sections = {name: raw.pop(name, {}) for name in cls.SECTIONS}
    for dotted, why in cls.UNUSED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(sections.get(section), dict) and key in sections[section]:
            raise ConfigError(f"{dotted} is not used by {cls.COMMAND}: {why}; remove it")
    cfg = cls(deepspeed=raw)
    for name, values in sections.items():
        setattr(cfg, name, _build(type(getattr(cfg, name)), values, name))
    return cfg


def _build(cls: type, values: Any, where: str):
    """Build dataclass ``cls`` from a dict, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {where}.{unknown[0]} (known keys in {where}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _check_type(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):  # Optional[X] or X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, where)
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{where} must be {expected.__name__}, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"{where} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value}")
    return value
