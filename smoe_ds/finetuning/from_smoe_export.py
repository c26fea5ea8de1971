"""Fine-tuning a model pretrained here: an export of ``smoe_ds.train`` (``smoe_ds.convert``'s directory,
model_type ``smoe_lm``) as ``hf.model``, or its DeepSpeed checkpoint folder, which is converted
first into ``run.out_dir/pretrained``.

The export is already a mixture of experts (or the dense baseline), so nothing is converted: each
rank loads its share (``from_export_sharded``: its N / ep_size experts, every other weight whole)
into the built-in LM with the task's head. The fine-tune's ``moe.mode`` and ``moe.num_experts``
(and ``moe.k`` for the learned baseline) must be the pretrained run's, so that the schedule and
evaluation speak of the same experts; ``moe.ep_size`` is free. Every mode of the trainer
fine-tunes: the learned baseline (DeepSpeed's own MoE, experts numbered per rank) with its
balance loss, THOR with its two passes and their consistency loss, as in pretraining. At the
end ``single_device_copy`` gathers the experts into one model for the export, as
``smoe_ds.hf.gather`` does for converted Hugging Face models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from smoe_ds.config.schema import ConfigError
from smoe_ds.hf.gather import _gather_experts, gather_expert_parts
from smoe_ds.models.transformers_lm import SMoEConfig
from smoe_ds.moe.experts import global_expert_name, is_stacked_expert_param
from smoe_ds.moe.layer import set_active_experts


def is_smoe_lm_export(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == SMoEConfig.model_type
    except (OSError, ValueError):
        return False


def is_checkpoint(path: str) -> bool:
    """A DeepSpeed checkpoint folder of smoe_ds.train (with ``latest``) or one tag folder in it: the
    two things ``smoe_ds.checkpoint.resolve_tag_dir`` accepts, told by the same files."""
    from smoe_ds.checkpoint.files import MODEL_FILE

    p = Path(path)
    return (p / MODEL_FILE).is_file() or (p / "latest").is_file()


def export_checkpoint(path: str, out: Path) -> Path:
    """Convert a checkpoint to an export in ``out`` (rank 0; kept for a rerun) and return ``out``.
    A collective: a conversion error reaches every rank as the same ConfigError."""
    from smoe_ds.checkpoint.export import convert
    from smoe_ds.distributed import process_group as D

    error = None
    if D.is_main() and not (out / "config.json").is_file():
        try:
            convert(path, out)
        except ConfigError as e:
            error = str(e)
    first_error = D.all_gather_object(error)[0]
    if first_error:
        raise ConfigError(first_error)
    return out


def check_export(path: str, moe, tokens: int) -> None:
    """ConfigError unless the fine-tune's ``moe`` section matches the export's mode and N, and its
    inputs (``tokens`` long at most) fit the model's context."""
    config = json.loads((Path(path) / "config.json").read_text())
    block = config.get("model", {}).get("block_size")
    if block is not None and tokens > block:
        raise ConfigError(
            f"hf.max_length makes inputs of {tokens} tokens, beyond {path}'s context of {block}; lower hf.max_length"
        )
    saved = config.get("moe", {})
    mode, n = saved.get("mode", "smoe_dropout"), saved.get("num_experts")
    if moe.mode != mode or (mode != "dense" and moe.num_experts != n):
        raise ConfigError(
            f"{path} was pretrained with moe.mode={mode}, moe.num_experts={n}: "
            f"set the same (--set moe.mode={mode} --set moe.num_experts={n})"
        )
    if mode == "learned" and moe.k != saved.get("k", moe.k):
        raise ConfigError(f"{path} was pretrained with the learned router at moe.k={saved['k']}: set the same")


def single_device_copy(module, ep_size: int, k: int):
    """Every rank calls this together; rank 0 gets the whole model (all experts, at ``k``), fp32,
    the others None. ``module`` is the engine's model (an ``SMoEFor...`` built by ``from_export_sharded``)."""
    params = dict(module.named_parameters())
    experts = {name: _gather_experts(p, ep_size) for name, p in params.items() if is_stacked_expert_param(name)}
    n_local = module.num_experts // ep_size
    for name, p in params.items():
        if ".deepspeed_experts." in name:  # DeepSpeed's own experts (learned): one tensor per local expert
            for rank, part in enumerate(gather_expert_parts(p, ep_size)):
                experts[global_expert_name(name, rank, n_local)] = part
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    copy = type(module)(module.config)  # every expert on one device
    with torch.no_grad():
        for name, p in copy.named_parameters():
            p.copy_((experts[name] if name in experts else params[name]).detach().float())
    set_active_experts(copy, k)
    return copy.eval()
