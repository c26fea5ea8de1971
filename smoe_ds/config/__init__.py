"""Run configuration: the typed schema, DeepSpeed's own sections checked against the installed
DeepSpeed, and renamed keys.

- ``schema``: the ``model``/``moe``/``data``/``run`` sections, strict loading, ``--set`` overrides;
- ``deepspeed_keys`` and ``deepspeed_params``: what the installed DeepSpeed reads, asked of it;
- ``renamed``: old spellings of keys and options, accepted with a warning;
- ``reference``: ``docs/config.md``, generated from the schema.
"""

from smoe_ds.config.schema import ConfigError, TrainConfig, config_cli, load_config

__all__ = ["ConfigError", "TrainConfig", "config_cli", "load_config"]
