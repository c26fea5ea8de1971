"""The built-in LM as a Hugging Face ``transformers`` model, for single-device inference.

``import smoe_ds`` registers ``SMoEConfig`` (model_type ``smoe_lm``) and the models below with
the Auto classes, so an exported decoder loads with ``AutoModelForCausalLM.from_pretrained(dir)``
and supports ``generate()``, and an exported encoder (``model.objective`` masked_lm) with
``AutoModelForMaskedLM``; ``AutoModel`` gives either one's final hidden states (``SMoEModel``) and
``AutoModelForSequenceClassification`` either one with a classification head. The model runs
with every expert on the one device (ep_size 1) and no process group;
``set_active_experts(model, k)`` (``smoe_ds.inference``) picks any k in [1, N].

The weights are stored stacked (``...experts.w_in`` [N, H, D]) rather than in DeepSpeed's
per-expert layout, so that the file's keys are exactly the module's parameter names.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, MaskedLMOutput, SequenceClassifierOutput

from smoe_ds.config.schema import KScheduleConfig, ModelConfig, MoEConfig


class SMoEConfig(PretrainedConfig):
    """The built-in LM's ``model`` and ``moe`` sections, plus the k the model runs at."""

    model_type = "smoe_lm"

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        moe: dict[str, Any] | None = None,
        active_experts: int | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        self.model = dict(model or {})
        self.moe = dict(moe or {})
        n = self.moe.get("num_experts", MoEConfig.num_experts)
        self.active_experts = active_experts if active_experts is not None else n
        kwargs.setdefault("use_cache", False)  # no KV cache: each step reruns the (short) context
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # The standard names, for the parts of transformers that look them up.
        self.vocab_size = self.model.get("vocab_size", ModelConfig.vocab_size)
        self.hidden_size = self.model.get("d_model", ModelConfig.d_model)
        self.num_hidden_layers = self.model.get("n_layers", ModelConfig.n_layers)
        self.num_attention_heads = self.model.get("n_heads", ModelConfig.n_heads)
        self.max_position_embeddings = self.model.get("block_size", ModelConfig.block_size)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    @property
    def is_encoder(self) -> bool:
        return self.model.get("objective", ModelConfig.objective) == "masked_lm"

    def moe_config(self, ep_size: int = 1) -> MoEConfig:
        moe = {**self.moe, "ep_size": ep_size}
        moe["k_schedule"] = KScheduleConfig(**moe.get("k_schedule", {}))
        return MoEConfig(**moe)


class _SMoEPreTrained(PreTrainedModel):
    """The built-in LM (``self.lm``, every expert, one device) inside a Hugging Face model: what the
    causal-LM and the classification models share, so both load the same exported weights."""

    config_class = SMoEConfig
    base_model_prefix = "lm"
    _tied_weights_keys = {"lm.lm_head.weight": "lm.tok_emb.weight"}
    _supports_cache_class = False

    def __init__(self, config: SMoEConfig, ep_size: int = 1, ep_rank: int = 0, for_deepspeed: bool = False) -> None:
        """Every expert on one device by default; ``ep_size``/``ep_rank``/``for_deepspeed`` build this
        rank's share for expert-parallel training instead (see ``from_export_sharded``)."""
        super().__init__(config)
        from smoe_ds.models.lm import build_model

        self.lm = build_model(config.model_config(), config.moe_config(ep_size), ep_rank, for_deepspeed)
        if ep_size == 1 and not for_deepspeed:
            for experts in self.expert_modules():
                experts.use_stacked_state_dict()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # build_model already initialised everything; from_pretrained overwrites it anyway

    def ready(self) -> None:
        """The end of a model's ``__init__``, once its head exists: the config's k, then transformers' own set-up."""
        self.set_active_experts(self.config.active_experts)
        self.post_init()

    def expert_modules(self):
        from smoe_ds.moe.experts import GroupedExperts

        return [m for m in self.modules() if isinstance(m, GroupedExperts)]

    @property
    def num_experts(self) -> int:
        return self.lm.moe_cfg.num_experts

    def set_active_experts(self, k: int) -> None:
        """``smoe_ds.moe.layer.set_active_experts(self, k)``, the spelling the docs use: kept as a
        method for code written against it."""
        from smoe_ds.moe.layer import set_active_experts

        set_active_experts(self, k)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lm.tok_emb

    @classmethod
    def from_export_sharded(cls, path, ep_size: int, ep_rank: int, for_deepspeed: bool = True, **config_kwargs):
        """This rank's share of an exported LM (``smoe_ds.convert``'s directory) for expert-parallel
        training: the experts of ``ep_rank`` (N / ``ep_size`` of them, sliced from the stacked
        tensors), every other weight whole; a head the export lacks (a classifier's) stays as drawn.
        ``config_kwargs`` go to the config (e.g. ``num_labels``). Call it after seeding torch the
        same on every rank, so that a new head starts the same everywhere."""
        from pathlib import Path

        from safetensors.torch import load_file

        from smoe_ds.moe.experts import global_expert_name, is_stacked_expert_param

        config = SMoEConfig.from_pretrained(path, **config_kwargs)
        model = cls(config, ep_size=ep_size, ep_rank=ep_rank, for_deepspeed=for_deepspeed)
        state = load_file(Path(path) / "model.safetensors")
        n_local = config.moe_config().num_experts // ep_size
        with torch.no_grad():
            for name, p in model.named_parameters():
                # DeepSpeed's own experts (the learned baseline) number theirs locally, the export globally
                key = global_expert_name(name, ep_rank, n_local)
                if key not in state:
                    continue  # the new head
                full = state[key]
                if is_stacked_expert_param(name):
                    full = full[ep_rank * p.shape[0] : (ep_rank + 1) * p.shape[0]]
                if full.shape != p.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(full.shape)}, the model {tuple(p.shape)}")
                p.copy_(full)
        return model


class SMoEForCausalLM(_SMoEPreTrained, GenerationMixin):
    def __init__(self, config: SMoEConfig, **sharding) -> None:
        if config.is_encoder:  # bidirectional: it would "predict" tokens it can see
            raise ValueError("this smoe_lm model is an encoder (masked_lm): load it with AutoModelForMaskedLM")
        super().__init__(config, **sharding)
        self.ready()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.lm_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, V]; with labels [B, T], the shifted next-token loss."""
        block = self.lm.cfg.block_size
        input_ids = input_ids[:, -block:]  # generation beyond the context keeps the last block
        out = self.lm(input_ids)
        loss = None
        if labels is not None:
            labels = labels[:, -block:]
            loss = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].float().reshape(-1, out.logits.size(-1)), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutput(loss=loss, logits=out.logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids}


class SMoEForMaskedLM(_SMoEPreTrained):
    """The encoder (``model.objective`` masked_lm) with its tied output layer: logits at every position."""

    def __init__(self, config: SMoEConfig, **sharding) -> None:
        if not config.is_encoder:
            raise ValueError("this smoe_lm model is a causal LM: load it with AutoModelForCausalLM")
        super().__init__(config, **sharding)
        self.ready()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs) -> MaskedLMOutput:
        """input_ids [B, T] -> logits [B, T, V]; with labels [B, T] (-100: not scored), the mean
        cross-entropy over the scored positions."""
        hidden_BTD, _ = self.lm.hidden_states(input_ids, attention_mask)
        logits = self.lm.lm_head(hidden_BTD)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


class SMoEModel(_SMoEPreTrained):
    """The built-in model without a head: ``last_hidden_state`` [B, T, D], what a task's own head
    reads (the math word problem solver's decoder, ``smoe_ds.finetuning.mwp_model``)."""

    def __init__(self, config: SMoEConfig, **sharding) -> None:
        super().__init__(config, **sharding)
        self.ready()

    def forward(self, input_ids, attention_mask=None, **kwargs) -> BaseModelOutput:
        hidden_BTD, _ = self.lm.hidden_states(input_ids, attention_mask)
        return BaseModelOutput(last_hidden_state=hidden_BTD)


class SMoEForSequenceClassification(_SMoEPreTrained):
    """The built-in LM with a classification head: a pretrained export (``smoe_ds.convert``) loads
    into it with ``AutoModelForSequenceClassification.from_pretrained(dir, num_labels=...)``, the
    head (``score``) new.

    Pooling: the encoder's first token ([CLS], which attends to every real token); the decoder's
    last real token's final hidden state, since only the last position of a causal model has read
    the whole sequence (a mean would mix in states that saw only a prefix). Sequences are
    right-padded; ``attention_mask`` [B, T] marks the real tokens.
    """

    def __init__(self, config: SMoEConfig, **sharding) -> None:
        super().__init__(config, **sharding)
        self.score = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.ready()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is getattr(self, "score", None):  # the new head; the LM's weights come from the export
            torch.nn.init.normal_(module.weight, std=0.02)
            torch.nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """input_ids [B, T] (right-padded) -> logits [B, num_labels]; with labels [B], cross-entropy."""
        hidden_BTD, aux = self.lm.hidden_states(input_ids, attention_mask)  # refuses inputs longer than block_size
        if self.config.is_encoder:
            at_B = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        elif attention_mask is None:
            at_B = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            at_B = attention_mask.long().sum(-1).clamp(min=1) - 1
        pooled_BD = hidden_BTD[torch.arange(input_ids.shape[0], device=input_ids.device), at_B]
        logits = self.score(pooled_BD)
        loss = (
            None
            if labels is None
            else self.lm.training_loss(torch.nn.functional.cross_entropy(logits.float(), labels), aux)
        )
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register() -> None:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from smoe_ds.models.byte_tokenizer import SMoEByteTokenizer

    AutoConfig.register(SMoEConfig.model_type, SMoEConfig, exist_ok=True)
    AutoTokenizer.register(SMoEConfig, slow_tokenizer_class=SMoEByteTokenizer, exist_ok=True)
    AutoModelForCausalLM.register(SMoEConfig, SMoEForCausalLM, exist_ok=True)
    AutoModelForMaskedLM.register(SMoEConfig, SMoEForMaskedLM, exist_ok=True)
    AutoModel.register(SMoEConfig, SMoEModel, exist_ok=True)
    AutoModelForSequenceClassification.register(SMoEConfig, SMoEForSequenceClassification, exist_ok=True)


register()  # on import: see smoe_ds/__init__.py
