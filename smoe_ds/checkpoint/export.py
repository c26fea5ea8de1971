"""A DeepSpeed checkpoint of the built-in LM as one Hugging Face directory, for single-device inference.

Takes a checkpoint of any ZeRO stage 0-2, ep_size and world size (the folder with ``latest``
or one tag folder), needs no process group, and writes ``model.safetensors`` (every expert
and every non-expert weight) and ``config.json`` (model config, N, router seed, the training
k schedule) that ``AutoModelForCausalLM.from_pretrained`` reads after ``import smoe_ds``
(an encoder, ``model.objective`` masked_lm: ``AutoModelForMaskedLM``). The command is
``smoe-convert`` (``smoe_ds.convert``).
"""

from __future__ import annotations

from pathlib import Path

from smoe_ds.checkpoint.files import read_meta, resolve_tag_dir
from smoe_ds.checkpoint.read import read_model
from smoe_ds.checkpoint.reshard import read_zero_state
from smoe_ds.config.schema import ConfigError


def convert(ckpt: str | Path, out_dir: str | Path, k: int | None = None):
    """Write the export and return the loaded model: ``SMoEForCausalLM``, or ``SMoEForMaskedLM`` for
    an encoder (``model.objective`` masked_lm), which ``AutoModelForMaskedLM`` then loads."""
    import dataclasses

    import torch

    from smoe_ds.models.transformers_lm import SMoEConfig, SMoEForCausalLM, SMoEForMaskedLM
    from smoe_ds.moe.experts import stack_per_expert_state

    tag_dir = resolve_tag_dir(ckpt)
    cfg, state, step = read_model(tag_dir)
    zero = read_zero_state(tag_dir, cfg, read_meta(tag_dir)["world_size"])  # resolve_tag_dir: the meta exists
    masters = zero["fp32"] if zero else None
    if masters is not None:  # ZeRO-1/2: the exact fp32 weights, even when the module ran in bf16/fp16
        unknown = sorted(set(masters) - set(state))
        if unknown:
            raise ConfigError(f"{tag_dir}: ZeRO shards hold parameters the model does not have, e.g. {unknown[0]}")
        state.update(masters)
    n = cfg.moe.num_experts
    if k is not None and not 1 <= k <= n:
        raise ConfigError(f"--k must be in [1, {n}], got {k}")
    hf_cfg = SMoEConfig(
        model=dataclasses.asdict(cfg.model),
        moe={key: v for key, v in dataclasses.asdict(cfg.moe).items() if key != "ep_size"},
        active_experts=k or cfg.moe.export_k(),
        trained_steps=step,
    )
    model = (SMoEForMaskedLM if hf_cfg.is_encoder else SMoEForCausalLM)(hf_cfg)
    state = {f"lm.{key}": v for key, v in state.items()}
    for name, module in model.named_modules():  # DeepSpeed's per-expert layout -> stacked tensors
        if module in model.expert_modules():
            stack_per_expert_state(module, state, f"{name}.")
    state.setdefault("lm.lm_head.weight", state["lm.tok_emb.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{tag_dir}: weights do not fit the saved config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    out = Path(out_dir)
    model.save_pretrained(out)
    if cfg.data.tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(cfg.data.tokenizer).save_pretrained(out)
    else:  # the trainer's UTF-8 bytes, as a Hugging Face tokenizer (smoe_ds.models.byte_tokenizer)
        from smoe_ds.models.byte_tokenizer import SMoEByteTokenizer

        SMoEByteTokenizer().save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if torch.is_tensor(t)})
    source = (
        f"fp32 masters from {len(list(tag_dir.glob('*zero_pp_rank_*')))} ZeRO shards" if masters else "module weights"
    )
    print(f"read {tag_dir} (step {step}, {cfg.moe.mode}, saved with ep_size {cfg.moe.ep_size}; {source})")
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    print(
        f"  {params / 1e6:.2f}M parameters, N = {n} experts, router seed {cfg.moe.router_seed}, "
        f"weights {'/'.join(dtypes)}, {size / 2**20:.1f} MiB on disk"
    )
    return model
