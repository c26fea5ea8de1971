"""A converted model as a standard Hugging Face directory that transformers' Auto classes load.

The directory holds ``config.json`` (an ``SMoEHFConfig``: model_type ``smoe_dropout_hf``, the
original architecture and its config, family, N, weighting, router seed and the k it was saved
at) and ``model.safetensors`` (every weight of the converted model, routers included;
past ``save_pretrained``'s ``max_shard_size``, shards and their ``model.safetensors.index.json``).

``import smoe_ds`` calls ``register``: the config joins ``AutoConfig``, and a loader joins
``AutoModel`` and the task Auto classes. The loader's ``from_pretrained`` builds the original
architecture from the stored config, converts it the same way, then loads the file strictly, so
``AutoModel.from_pretrained(dir)`` returns e.g. a converted ``BertModel`` that runs at the saved
k and takes ``set_active_experts``. Without ``import smoe_ds`` the model type is unknown and
``AutoConfig`` refuses the directory: it never loads as the dense model with its FFNs missing.

The loader is not a model class: what it returns is the original architecture's own class, so
heads, ``generate()`` and everything that checks the class work as for the dense model.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file
from transformers.utils.hub import get_checkpoint_shard_files

from smoe_ds.config.schema import ConfigError
from smoe_ds.hf.conversion import convert_model
from smoe_ds.hf.families import MODEL_TYPE
from smoe_ds.hf.smoe_config import FORMAT_VERSION, SMoEHFConfig, read_config
from smoe_ds.moe.layer import set_active_experts

# Auto classes the loader joins; each returns the saved architecture, head included, and a task
# class refuses an architecture that is not its own (AutoModel takes any).
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
AUTO_INTERNAL_KWARGS = ("_from_auto", "trust_remote_code", "adapter_kwargs")  # set by every Auto call


def weight_files(path: str | Path, **hub_kwargs) -> list[str]:
    """The local paths of ``path``'s weights: ``model.safetensors``, or the shards its index lists."""
    single = cached_file(str(path), SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if single is not None:
        return [single]
    index = cached_file(str(path), SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if index is None:
        raise ConfigError(f"{path}: an SMoE-Dropout config without weights (no {SAFE_WEIGHTS_NAME} or its index)")
    shards, _ = get_checkpoint_shard_files(str(path), index, **hub_kwargs)
    return shards


def load_weights(model: nn.Module, files: list[str]) -> None:
    """Every weight of ``model`` from ``files``, strictly: a key missing from the files is an error
    unless it names a tensor that another, loaded key shares (tied weights are saved once)."""
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    names_of = {}  # tensor -> every name it has in the model
    for name, t in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(t), []).append(name)
    shared_loaded = {n for names in names_of.values() if set(names) & state.keys() for n in names}
    missing = [name for name in missing if name not in shared_loaded]
    if missing or unexpected:
        raise ConfigError(
            f"the SMoE-Dropout weights do not fit the model their config describes: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def build(config: SMoEHFConfig, files: list[str]) -> PreTrainedModel:
    """The converted model ``config`` describes, with the weights of ``files``, at the saved k."""
    if config.format_version != FORMAT_VERSION:
        raise ConfigError(f"SMoE-Dropout format_version {config.format_version}, expected {FORMAT_VERSION}")
    model_cls = getattr(transformers, config.architecture, None)
    if model_cls is None:
        raise ConfigError(f"transformers has no model class {config.architecture!r}")
    spec = config.spec
    # The dense weights drawn here are overwritten by the files: only the structure matters.
    model = model_cls(config.base())
    convert_model(model, spec.num_experts, spec.weighting, spec.router_seed)
    load_weights(model, files)
    set_active_experts(model, config.active_experts)
    return model.eval()


def load_smoe(path: str | Path) -> PreTrainedModel:
    """Rebuild a model written by ``save_pretrained`` (``smoe_ds.hf.save``): the original architecture
    from its config, converted the same way, then the saved weights; it runs at the saved k. The same as
    ``AutoModel.from_pretrained``."""
    return SMoEDropoutLoader.from_pretrained(path)


class SMoEDropoutLoader:
    """Registered with one Auto class (``auto_class``, set per subclass by ``register``)."""

    config_class = SMoEHFConfig
    auto_class = "AutoModel"

    @classmethod
    def from_pretrained(cls, path, *model_args, config: SMoEHFConfig | None = None, **kwargs) -> PreTrainedModel:
        hub = {k: v for k in HUB_KWARGS if (v := kwargs.pop(k, None)) is not None}
        for k in AUTO_INTERNAL_KWARGS:
            kwargs.pop(k, None)
        if model_args or kwargs:  # e.g. dtype or device_map: refused rather than silently ignored
            raise ConfigError(
                f"loading an SMoE-Dropout model takes no options besides {', '.join(HUB_KWARGS)}; "
                f"got {', '.join([*map(repr, model_args), *kwargs])}"
            )
        config = config if config is not None else read_config(path, **hub)
        cls._check_task(config)
        return build(config, weight_files(path, **hub))

    @classmethod
    def _check_task(cls, config: SMoEHFConfig) -> None:
        if cls.auto_class == "AutoModel":
            return
        base = config.base()
        mapping = getattr(transformers, cls.auto_class)._model_mapping
        expected = mapping[type(base)].__name__ if type(base) in mapping else None
        if expected != config.architecture:
            raise ConfigError(
                f"this SMoE-Dropout model is a converted {config.architecture}, which {cls.auto_class} does not "
                f"load (it loads {expected or f'no {base.model_type} model'}); use AutoModel"
            )


def register() -> None:
    transformers.AutoConfig.register(MODEL_TYPE, SMoEHFConfig, exist_ok=True)
    for name in AUTO_CLASSES:
        loader = type(f"SMoEDropout{name[4:]}Loader", (SMoEDropoutLoader,), {"auto_class": name})
        getattr(transformers, name).register(SMoEHFConfig, loader, exist_ok=True)


register()  # on import: see smoe_ds/__init__.py
