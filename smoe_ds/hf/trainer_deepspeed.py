"""A converted model readied for a Hugging Face ``Trainer``'s DeepSpeed integration, at any ZeRO stage
and ep_size.

Trainer calls ``deepspeed.initialize`` itself: ``Trainer.train`` builds the optimizer
(``transformers/integrations/deepspeed.py``, ``deepspeed_optim_sched``: a flat list of every
trainable weight when the DeepSpeed config has an ``optimizer`` section, else
``Trainer.create_optimizer``) and accelerate hands it to the engine (``accelerate/accelerator.py``,
``_prepare_deepspeed``). What SMoE-Dropout needs before that call is set up around the Trainer:

- ZeRO-0/1/2, ep_size 1: plain layers; the experts lose DeepSpeed's expert tag, so ZeRO reduces
  them with every other weight (tagged, ZeRO-2 looks up an expert-data-parallel group that only
  DeepSpeed ``MoE`` layers make, ``runtime/zero/stage_1_and_2.py``).
- ZeRO-0/1/2, ep_size > 1: DeepSpeed ``MoE`` layers holding this rank's N / ep_size experts (the
  engine makes the expert groups and reduces expert gradients over the expert-data-parallel group
  only), and the experts in optimizer groups of their own, split by DeepSpeed's
  ``split_params_into_different_moe_groups_for_optimizer``, or ZeRO-1/2 stops on "None of the param
  groups are marked as MoE". Trainer's documented ``optimizer_cls_and_kwargs`` argument carries those
  groups to ``create_optimizer``, which Trainer calls when the DeepSpeed config has no ``optimizer``.
- ZeRO-3, any ep_size: plain layers, readied as smoe-train readies them
  (``smoe_ds.distributed.zero3.prepare_model``: expert groups made, experts tagged to be partitioned
  over their expert-data-parallel group); the optimizer's groups need no split.

``convert_for_trainer`` picks the layers and this rank's experts, ``optimizer_cls_and_kwargs`` the
groups; ``ready_for_deepspeed`` (the callback runs it when the Trainer is built) does the rest and
refuses, in one line, what would fail inside the engine.

Saving: a converted model's ``save_pretrained`` writes an SMoE directory (``smoe_ds.hf.save``), and
Trainer's ``save_model`` (its checkpoints' too) calls it on rank 0 with the weights DeepSpeed hands
over, gathered under ZeRO-3 when the config has ``stage3_gather_16bit_weights_on_model_save``. Under
expert parallelism rank 0 holds only its own experts, so ``save_model_gathering_experts`` (``install``
runs it) makes ``save_model``, which every rank calls, gather them first.
"""

from __future__ import annotations

from collections.abc import Mapping

from smoe_ds.config.schema import ConfigError
from smoe_ds.distributed import process_group as D
from smoe_ds.distributed import zero3
from smoe_ds.hf.conversion import convert_model
from smoe_ds.hf.gather import single_device_copy
from smoe_ds.hf.save import saving_whole_copy
from smoe_ds.hf.surgery import DEFAULT_ROUTER_SEED, active_experts, model_ep_size
from smoe_ds.moe.layer import moe_layers
from smoe_ds.moe.parallel import ep_rank_of, expert_parallel_rank
from smoe_ds.ops.prebuild import without_shm_allreduce
from smoe_ds.training.runtime import optimizer_param_groups

DOCS = "docs/hf_trainer.md"
HOW_TO_CONVERT = "convert it with smoe_ds.hf.convert_for_trainer"
HOW_TO_OPTIMIZE = (
    "leave the DeepSpeed config without an optimizer section and pass "
    "Trainer(optimizer_cls_and_kwargs=smoe_ds.hf.optimizer_cls_and_kwargs(model, args))"
)


def zero_stage(args) -> int | None:
    """The ZeRO stage of a ``TrainingArguments``' DeepSpeed config; None when it runs without DeepSpeed."""
    if not args.deepspeed:
        return None
    return int(args.hf_deepspeed_config.get_value("zero_optimization.stage", 0))


def has_deepspeed_moe(model) -> bool:
    """Whether the model's layers are DeepSpeed ``MoE`` instances (``convert_model(for_deepspeed=True)``)."""
    from deepspeed.moe.layer import MoE

    return any(isinstance(layer, MoE) for layer in moe_layers(model))


def convert_for_trainer(
    model,
    num_experts: int,
    args,
    ep_size: int = 1,
    weighting: str = "rescale",
    router_seed: int = DEFAULT_ROUTER_SEED,
):
    """``convert_model`` for a Trainer run with ``args`` (its ``TrainingArguments``): this rank's
    N / ``ep_size`` experts, in the layers its ZeRO stage needs (DeepSpeed ``MoE`` ones for
    ep_size > 1 at ZeRO-0/1/2, plain ones otherwise). Returns ``model``.

    Build ``args`` after loading the model and before this call: ``args.process_index`` is the rank,
    and under ZeRO-3 a model loaded after ``TrainingArguments`` exists is partitioned as it loads
    (transformers' ``zero.Init``), before it could be converted.
    """
    stage = zero_stage(args)
    if ep_size > 1 and stage is None:
        raise needs_deepspeed(ep_size)
    ep_rank = ep_rank_of(args.process_index, ep_size)
    moe_flavour = ep_size > 1 and stage < 3
    return convert_model(model, num_experts, weighting, router_seed, ep_size, ep_rank, for_deepspeed=moe_flavour)


def optimizer_cls_and_kwargs(model, args) -> tuple[type, dict]:
    """What ``Trainer(optimizer_cls_and_kwargs=...)`` takes: the optimizer ``args`` asks for
    (``optim``, learning rate, betas, eps) over smoe-ds's parameter groups
    (``smoe_ds.training.runtime.optimizer_param_groups``: weight decay on matrices only, the frozen
    routers in no group) with, for DeepSpeed ``MoE`` layers, the experts in groups of their own.

    ``Trainer.create_optimizer`` builds the optimizer over the ``params`` of these keyword arguments
    instead of its own two groups.
    """
    from transformers import Trainer
    from transformers.trainer_optimizer import is_optimizer_factory

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if is_optimizer_factory(cls):
        raise ConfigError(f"optim {args.optim} builds its own parameter groups: use an optimizer class (adamw_torch)")
    groups = optimizer_param_groups(model, args.weight_decay, split_experts=has_deepspeed_moe(model))
    return cls, {**kwargs, "params": groups}


def needs_deepspeed(ep_size: int) -> ConfigError:
    integration = "Trainer's DeepSpeed integration (TrainingArguments(deepspeed=...))"
    return ConfigError(f"expert parallelism (ep_size {ep_size}) needs {integration}")


def optimizer_groups_of(trainer) -> list[dict] | None:
    """The parameter groups ``trainer`` will build its optimizer from when its DeepSpeed config has no
    ``optimizer``: ``optimizer_cls_and_kwargs``'s ``params``, ``[]`` for Trainer's own two, None
    where a subclass builds its own (``create_optimizer`` overridden)."""
    from transformers import Trainer

    if trainer.optimizer_cls_and_kwargs is not None:
        return list(trainer.optimizer_cls_and_kwargs[1].get("params", []))
    return [] if type(trainer).create_optimizer is Trainer.create_optimizer else None


def ready_for_trainer(model, args, optimizer_groups: list[dict] | None = None) -> None:
    """``ready_for_deepspeed`` with the DeepSpeed config of ``args`` (a ``TrainingArguments``); without
    DeepSpeed, ConfigError for a model converted for expert parallelism, else nothing to do."""
    if args.deepspeed:
        ready_for_deepspeed(model, args.hf_deepspeed_config.config, optimizer_groups)
    elif model_ep_size(model) > 1:
        raise needs_deepspeed(model_ep_size(model))


def ready_for_deepspeed(model, ds_config: Mapping, optimizer_groups: list[dict] | None = None) -> None:
    """Ready a converted model for Trainer's ``deepspeed.initialize`` with ``ds_config`` (the module's
    docstring says what each stage gets), after joining DeepSpeed's process group to accelerate's.

    ``optimizer_groups``: the ``params`` Trainer will build its optimizer from (``[]`` for Trainer's
    own two groups), or None where that is not known; checked for the experts' own groups where
    the stage needs them. ConfigError, before anything changes, for a model or optimizer that the
    engine would refuse or train wrongly.
    """
    ep_size = model_ep_size(model)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    moe_flavour = has_deepspeed_moe(model)
    if stage == 3 and moe_flavour:
        raise ConfigError(f"this model was converted for expert parallelism at ZeRO-0/1/2, not 3: {HOW_TO_CONVERT}")
    if stage < 3 and ep_size > 1 and not moe_flavour:
        raise ConfigError(f"ep_size {ep_size} at ZeRO-{stage} needs DeepSpeed MoE layers: {HOW_TO_CONVERT}")
    if moe_flavour:
        split = optimizer_groups is None or any(group.get("moe") for group in optimizer_groups)
        if "optimizer" in ds_config or not split:
            raise ConfigError(
                f"expert parallelism at ZeRO-{stage} needs the experts in optimizer groups of their own: "
                f"{HOW_TO_OPTIMIZE} ({DOCS})"
            )
    join_process_group()
    if stage == 3:
        zero3.prepare_model(model, ep_size)
    elif not moe_flavour:
        for layer in moe_layers(model):
            for p in layer.deepspeed_moe.experts.parameters():
                p.allreduce = True  # every rank holds all N experts: reduce them like every other weight


def join_process_group() -> None:
    """DeepSpeed's process group over the ranks accelerate started (gloo's allreduce on CPU, as in
    smoe-ds's own runs: ``smoe_ds.ops.prebuild.without_shm_allreduce``)."""
    import deepspeed

    if not deepspeed.comm.is_initialized():
        with without_shm_allreduce():
            deepspeed.init_distributed(dist_backend=D.backend_name(), verbose=False)


def check_expert_ranks(model, process_index: int) -> None:
    """After the engine is built: this rank holds the experts DeepSpeed's groups say it should
    (``convert_for_trainer`` assumed runs of ep_size consecutive ranks, ``smoe_ds.moe.parallel``)."""
    ep_size = model_ep_size(model)
    if ep_size > 1 and expert_parallel_rank(ep_size) != ep_rank_of(process_index, ep_size):
        raise RuntimeError(
            f"rank {process_index} holds the experts of expert-parallel rank {ep_rank_of(process_index, ep_size)}, "
            f"but DeepSpeed's groups make it rank {expert_parallel_rank(ep_size)}"
        )


def save_model_gathering_experts(trainer) -> None:
    """Where ``trainer.model`` is expert-parallel, make ``trainer.save_model`` (every rank calls it, for
    checkpoints too) gather the experts into one single-device copy, which rank 0's
    ``save_pretrained`` then writes; nothing changes at ep_size 1."""
    model = trainer.model
    ep_size = model_ep_size(model)
    if ep_size == 1:
        return
    trainers_save_model = trainer.save_model

    def save_model(output_dir: str | None = None, _internal_call: bool = False) -> None:
        whole = None
        if weights_reach_save_pretrained(trainer):
            with zero3.gathered_module(model):  # ZeRO-3: each local expert whole first (else nothing to do)
                whole = single_device_copy(model, ep_size, k=active_experts(model))
        with saving_whole_copy(model, whole):
            trainers_save_model(output_dir, _internal_call)

    trainer.save_model = save_model


def weights_reach_save_pretrained(trainer) -> bool:
    """False where Trainer saves a ZeRO-3 model without its weights (no
    ``stage3_gather_16bit_weights_on_model_save``: a DeepSpeed checkpoint instead)."""
    engine = getattr(trainer, "deepspeed", None)
    if engine is None or zero_stage(trainer.args) != 3:
        return True
    return bool(engine.zero_gather_16bit_weights_on_model_save())
