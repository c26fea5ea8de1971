"""From a config to a running DeepSpeed engine, shared by training and evaluation.

Order matters: every check that can fail on user input runs before anything heavy and
before anything is written, so a bad config costs a second, not a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoe_ds.config.schema import ConfigError, TrainConfig
from smoe_ds.data import Corpus, eval_batches
from smoe_ds.distributed import process_group as D
from smoe_ds.distributed import watchdog
from smoe_ds.distributed.zero3 import prepare_model as zero3_prepare
from smoe_ds.masking import MaskingSpec, masked_eval_batches
from smoe_ds.models.lm import SMoELM, build_model
from smoe_ds.moe.parallel import ep_rank_of, expert_parallel_rank
from smoe_ds.training import preflight


@dataclass
class Runtime:
    cfg: TrainConfig
    engine: "deepspeed.DeepSpeedEngine"  # noqa: F821
    model: SMoELM
    corpus: Corpus
    rank: int
    world_size: int
    micro_batch: int
    masking: MaskingSpec | None = None  # the encoder's (model.objective "masked_lm"), else None

    def val_batches(self, max_batches: int) -> list:
        """This rank's validation micro-batches: (x, next tokens), or the encoder's (inputs, labels)."""
        blocks, micro = self.corpus.val_blocks, self.micro_batch
        if self.masking is None:
            return eval_batches(blocks, micro, self.rank, self.world_size, max_batches)
        seed = self.cfg.data.seed
        return masked_eval_batches(blocks, self.masking, seed, micro, self.rank, self.world_size, max_batches)


def optimizer_param_groups(
    model: torch.nn.Module, weight_decay: float, split_experts: bool = True, lr_of: dict | None = None
) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms; frozen routers in no group at all.

    ``lr_of`` (parameter id -> learning rate) puts those parameters in groups of their own with
    that rate (e.g. a fine-tune's new head); DeepSpeed's optimizer and LR schedule keep a group's
    own ``lr``, and the schedule scales it like the others.

    With ``split_experts`` the groups are then split by DeepSpeed so that expert parameters form
    their own groups, which is what lets ZeRO-0/1/2 reduce them over the expert-data-parallel group
    only. ZeRO-3 needs no split (each parameter is reduced over the group it is partitioned over)
    and its engine rejects MoE groups from a model without DeepSpeed ``MoE`` layers.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    lr_of = lr_of or {}
    by_key: dict[tuple[bool, float | None], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            by_key.setdefault((p.dim() >= 2, lr_of.get(id(p))), []).append(p)
    groups = []
    for (decays, lr), params in sorted(by_key.items(), key=lambda kv: (not kv[0][0], kv[0][1] is not None)):
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        group["name"] = ("decay" if decays else "no_decay") + ("" if lr is None else f"_lr{lr:g}")
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return split_params_into_different_moe_groups_for_optimizer(groups) if split_experts else groups


def initialize_engine(
    model: torch.nn.Module, cfg: TrainConfig, lr_of: dict | None = None
) -> "deepspeed.DeepSpeedEngine":  # noqa: F821
    """The DeepSpeed engine of ``model`` with the config's DeepSpeed section and our param groups.

    Under ZeRO-3 ``model``'s MoE layers must be the plain ones (``build_model(for_deepspeed=False)``);
    they are readied for ZeRO-3's partitioning here (``smoe_ds.distributed.zero3``). ``lr_of``: see
    ``optimizer_param_groups``.
    """
    import deepspeed

    zero3 = cfg.zero_stage == 3
    if zero3:
        zero3_prepare(model, cfg.moe.ep_size)
    weight_decay = cfg.deepspeed.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    groups = optimizer_param_groups(model, weight_decay, split_experts=not zero3, lr_of=lr_of)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg.deepspeed)
    return engine


def build_runtime(cfg: TrainConfig, training: bool = False) -> Runtime:
    """Join the process group, load the data, build the model and the DeepSpeed engine.

    Every check of the input (smoe_ds.training.preflight) runs first, on every rank, and writes nothing;
    ``training`` adds the checks that the training split fills a step and that a checkpoint
    to resume from was written by this model.
    """
    D.init_distributed(cfg.run.master_port, cfg.run.collective_timeout_s)
    rank, world = D.rank(), D.world_size()
    cfg.validate_for_world(world)
    preflight.check_out_dir(cfg.run.out_dir)
    preflight.check_precision(cfg)
    if cfg.model.objective == "masked_lm" and not cfg.data.tokenizer:  # a shipped config leaves it to --set
        raise ConfigError(
            "model.objective masked_lm needs data.tokenizer: a Hugging Face tokenizer folder with a mask token "
            "(e.g. --set data.tokenizer=$(python -m smoe_ds.hf.local_models minilm))"
        )
    corpus = preflight.load_corpus_on_every_rank(cfg)  # a data.tokenizer that is no tokenizer fails in here
    masking = MaskingSpec.of_tokenizer(cfg.data.tokenizer) if cfg.model.objective == "masked_lm" else None
    cfg.model.vocab_size = corpus.vocab_size
    micro = cfg.micro_batch_size(world)
    preflight.check_validation(cfg, corpus, world)
    if training:
        preflight.check_training(cfg, corpus, world)

    # From here on a dead peer would leave this rank waiting in a collective: watch for one.
    watchdog.start(cfg.run.heartbeat_interval_s, cfg.run.dead_rank_timeout_s)
    torch.manual_seed(cfg.run.seed)
    # DeepSpeed's expert-parallel groups are runs of consecutive ranks (checked below).
    ep_rank = ep_rank_of(rank, cfg.expert_parallel_size)
    model = build_model(cfg.model, cfg.moe, ep_rank=ep_rank, for_deepspeed=cfg.zero_stage != 3)
    engine = initialize_engine(model, cfg)
    if cfg.uses_moe:
        actual = expert_parallel_rank(cfg.moe.ep_size)
        if actual != ep_rank:
            raise RuntimeError(f"expert-parallel rank {actual} != assumed {ep_rank}: expert init would be wrong")
    return Runtime(cfg, engine, model, corpus, rank, world, micro, masking)
