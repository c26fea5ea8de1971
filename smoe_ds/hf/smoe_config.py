"""The config of an SMoE directory: what rebuilds a converted model (the original architecture and its
config, family, N, weighting, router seed, and the k it was saved at), model_type ``smoe_dropout_hf``.
``smoe_ds.hf.save`` writes it, ``smoe_ds.hf.auto`` reads it and registers it with ``AutoConfig``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import transformers
from transformers import PretrainedConfig, PreTrainedModel

from smoe_ds.config.schema import ConfigError
from smoe_ds.hf.families import MODEL_TYPE
from smoe_ds.hf.surgery import SMoESpec, active_experts, spec_of

FORMAT_VERSION = 2  # 1 was smoe_config.json + smoe_model.safetensors


class SMoEHFConfig(PretrainedConfig):
    """What rebuilds a converted model: the original architecture and config, and the SMoE spec."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        architecture: str | None = None,
        base_model_type: str | None = None,
        base_config: dict | None = None,
        family: str | None = None,
        num_experts: int | None = None,
        weighting: str | None = None,
        router_seed: int | None = None,
        num_layers: int | None = None,
        active_experts: int | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ) -> None:
        self.architecture = architecture
        self.base_model_type = base_model_type
        self.base_config = dict(base_config or {})
        self.family = family
        self.num_experts = num_experts
        self.weighting = weighting
        self.router_seed = router_seed
        self.num_layers = num_layers
        self.active_experts = active_experts
        self.format_version = format_version
        super().__init__(**kwargs)

    @classmethod
    def of(cls, model: PreTrainedModel) -> SMoEHFConfig:
        base = model.config.to_dict()
        # Kept apart: given a nested dict whose model_type is its own, a config class's from_pretrained
        # takes that dict, so e.g. GPT2LMHeadModel.from_pretrained(dir) would build the right shapes
        # and load every weight but the FFNs'.
        base_model_type = base.pop("model_type")
        return cls(
            architecture=type(model).__name__,
            base_model_type=base_model_type,
            base_config=base,
            active_experts=active_experts(model),
            **asdict(spec_of(model)),
        )

    def base(self) -> PretrainedConfig:
        """The original architecture's config."""
        return transformers.AutoConfig.for_model(self.base_model_type, **self.base_config)

    @property
    def spec(self) -> SMoESpec:
        return SMoESpec(**{f: getattr(self, f) for f in SMoESpec.__dataclass_fields__})


def read_config(path: str | Path, **hub_kwargs) -> SMoEHFConfig:
    """``path``'s config.json as an SMoEHFConfig; ConfigError when it is not an SMoE directory."""
    try:
        config_dict, _ = SMoEHFConfig.get_config_dict(str(path), **hub_kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not an SMoE-Dropout directory ({str(e).splitlines()[0]})") from e
    if config_dict.get("model_type") != MODEL_TYPE:
        raise ConfigError(
            f"{path}: not an SMoE-Dropout directory (config.json has model_type "
            f"{config_dict.get('model_type')!r}, not {MODEL_TYPE!r})"
        )
    return SMoEHFConfig.from_dict(config_dict)
