"""The DeepSpeed section is checked against the installed DeepSpeed (issue 30): unknown top-level
keys, unknown or badly typed fields of its pydantic sections, and optimizer or scheduler types it
cannot build are refused in one line when the config loads, before anything is written."""

import inspect
import json
import re

import pytest

from smoe_ds.config import deepspeed_keys
from smoe_ds.config.schema import OUR_SECTIONS, ConfigError, load_config
from smoe_ds.finetuning.config import FinetuneConfig
from tests.helpers.launch import REPO
from tests.test_cli_errors import refuse, sets

SHIPPED = sorted((REPO / "ds_configs").glob("*.json")) + sorted((REPO / "tests" / "configs").glob("*.json"))
BASE = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def write(tmp_path, data) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    return str(path)


def load(tmp_path, data, *overrides: str):
    return load_config(write(tmp_path, data), list(overrides))


def refused(tmp_path, data, *overrides: str, cls=None) -> str:
    """The one-line message that loading ``data`` with ``overrides`` is refused with."""
    with pytest.raises(ConfigError) as info:
        if cls is None:
            load(tmp_path, data, *overrides)
        else:
            load_config(write(tmp_path, data), list(overrides), cls=cls)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- the key set -----------------------------------------------------------------------------------


def test_every_key_of_every_shipped_config_is_known():
    assert SHIPPED
    for path in SHIPPED:
        raw = json.loads(path.read_text())
        if path.name.startswith("finetune_"):  # smoe_ds.finetune's, as tests/config/test_config.py tells them apart
            load_config(str(path), ["hf.model=m", "data.train=t", "data.validation=v"], cls=FinetuneConfig)
            ours = FinetuneConfig.SECTIONS
        else:
            load_config(str(path))
            ours = OUR_SECTIONS
        unknown = [k for k in raw if k not in ours and k not in deepspeed_keys.known_keys()]
        assert not unknown, (path.name, unknown)


def test_known_keys_are_top_level_keys_only():
    known = deepspeed_keys.known_keys()
    assert {"zero_optimization", "optimizer", "scheduler", "fp16", "bf16", "train_micro_batch_size_per_gpu"} <= known
    # Names of fields inside sections are constants of DeepSpeed too, but not top-level keys.
    assert not {"stage", "enabled", "type", "params", "lr", "offload_optimizer", "output_path"} & known
    assert not set(OUR_SECTIONS) & known


def test_known_keys_cover_every_top_level_read_in_deepspeeds_config_source():
    """Cross-check of the trace: the keys runtime/config.py reads from ``param_dict`` by name."""
    import deepspeed.runtime.config as ds_config

    source = inspect.getsource(ds_config)
    patterns = (
        r"get_scalar_param\(param_dict,\s*(\w+)",
        r"param_dict\.get\(\s*(\w+|'\w+'|\"\w+\")",
        r"param_dict\[(\w+|'\w+'|\"\w+\")\]",
        r"(\w+|'\w+'|\"\w+\") (?:not )?in param_dict(?:\.keys\(\))?(?!\[)",
    )
    names = {m for p in patterns for m in re.findall(p, source)}
    read = {n.strip("'\"") if n[0] in "'\"" else getattr(ds_config, n, None) for n in names}
    read = {k for k in read if isinstance(k, str)}
    assert len(read) >= 25  # the scan still finds the reads (30 in 0.19.8)
    assert read <= deepspeed_keys.known_keys(), read - deepspeed_keys.known_keys()


# DeepSpeed's documented top-level sections (https://www.deepspeed.ai/docs/config-json/) that 0.19.8
# reads, each with a value of the kind the docs show.
DOCUMENTED = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000}},
    "communication_data_type": "fp32",
    "prescale_gradients": False,
    "gradient_predivide_factor": 1.0,
    "gradient_allreduce_op": "mean",
    "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2},
    "bf16": {"enabled": True},
    "torch_autocast": {"enabled": False, "dtype": "bfloat16"},
    "gradient_clipping": 1.0,
    "zero_optimization": {
        "stage": 2,
        "allgather_partitions": True,
        "allgather_bucket_size": 500000000,
        "overlap_comm": False,
        "reduce_scatter": True,
        "reduce_bucket_size": 500000000,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "round_robin_gradients": False,
    },
    "zero_allow_untested_optimizer": False,
    "zero_force_ds_cpu_optimizer": True,
    "steps_per_print": 10,
    "wall_clock_breakdown": False,
    "memory_breakdown": False,
    "dump_state": False,
    "flops_profiler": {"enabled": False, "profile_step": 1, "module_depth": -1, "top_modules": 1, "detailed": True},
    "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False, "profile": False},
    "data_efficiency": {"enabled": False, "seed": 1234},
    "tensorboard": {"enabled": True, "output_path": "log/", "job_name": "tb"},
    "wandb": {"enabled": False, "group": "g", "team": "t", "project": "p"},
    "csv_monitor": {"enabled": True, "output_path": "log/", "job_name": "csv"},
    "comet": {"enabled": False, "project": "p", "experiment_name": "e"},
    "comms_logger": {"enabled": False, "verbose": False, "prof_all": True, "debug": False},
    "checkpoint": {"tag_validation": "Warn", "load_universal": False, "use_node_local_storage": False},
    "data_types": {"grad_accum_dtype": "fp32"},
    # the docs' thread_count is intra_op_parallelism in 0.19.8, which ignores the old name (so smoe-ds refuses it)
    "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False},
    "autotuning": {"enabled": False},
    "pipeline": {"activation_checkpoint_interval": 0},
    "dataloader_drop_last": False,
    "compile": {"deepcompile": False},
}


def test_deepspeeds_documented_sections_pass(tmp_path):
    cfg = load(tmp_path, DOCUMENTED)
    assert cfg.deepspeed["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


# Documented once, removed since: DeepSpeed 0.19.8 refuses them itself, so the config does too, with its reason.
REMOVED = {
    "amp": "NVIDIA Apex AMP integration has been removed",
    "sparse_gradients": "Sparse compression of dense torch.nn.Embedding gradients has been removed",
    "sparse_attention": "DeepSpeed Sparse Attention has been removed",
    "elasticity": "Elastic training has been removed",
    "curriculum_learning": "Use 'data_efficiency.data_sampling.curriculum_learning' instead",
    "compression_training": "The DeepSpeed compression library has been removed",
    "progressive_layer_drop": "Progressive Layer Dropping has been removed",
    "eigenvalue": "has been removed",
}


@pytest.mark.parametrize("key", sorted(REMOVED))
def test_sections_deepspeed_removed_are_refused_with_its_reason(tmp_path, key):
    message = refused(tmp_path, {**BASE, key: {"enabled": True}})
    assert message.startswith(f"'{key}' is no longer read by DeepSpeed 0.19.8: ") and REMOVED[key] in message


# -- one line for each problem -----------------------------------------------------------------------

CASES = {  # --set overrides -> the message, whole
    "typo_of_a_section": (
        ["zero_optimisation.stage=2"],
        "unknown key 'zero_optimisation' (did you mean 'zero_optimization'?)",
    ),
    "typo_of_a_scalar": (["gradient_clip=1.0"], "unknown key 'gradient_clip' (did you mean 'gradient_clipping'?)"),
    "typo_of_our_section": (["modle.d_model=64"], "unknown key 'modle' (did you mean 'model'?)"),
    "nothing_close": (
        ["xyzzy=1"],
        "unknown key 'xyzzy': neither a section of this config (model, moe, data, run) nor a key DeepSpeed 0.19.8 "
        "reads (https://www.deepspeed.ai/docs/config-json/)",
    ),
    "finetune_section_given_to_the_trainer": (
        ["hf.model=m"],
        "'hf' is a section of smoe_ds.finetune's config, not of this one, whose sections are model, moe, data, run",
    ),
    "field_typo": (["zero_optimization.stagee=2"], "zero_optimization.stagee: unknown field (did you mean 'stage'?)"),
    "nested_field_typo": (
        ["zero_optimization.offload_optimizer.devic=cpu"],
        "zero_optimization.offload_optimizer.devic: unknown field (did you mean 'device'?)",
    ),
    "monitor_field_typo": (
        ["tensorboard.enabeld=true"],
        "tensorboard.enabeld: unknown field (did you mean 'enabled'?)",
    ),
    "fp16_field_typo": (["fp16.loss_scal=0"], "fp16.loss_scal: unknown field (did you mean 'loss_scale'?)"),
    "bad_type": (["zero_optimization.stage=two"], "zero_optimization.stage: must be 0, 1, 2 or 3, got 'two'"),
    "bad_bool": (["bf16.enabled=maybe"], "bf16.enabled: must be true or false, got 'maybe'"),
    "bad_enum": (
        ["zero_optimization.offload_optimizer.device=gpu"],
        "zero_optimization.offload_optimizer.device: must be 'none', 'cpu' or 'nvme', got 'gpu'",
    ),
    "out_of_range": (
        ["zero_optimization.reduce_bucket_size=0"],
        "zero_optimization.reduce_bucket_size: must be greater than 0, got 0",
    ),
    "section_not_an_object": (["zero_optimization=2"], "zero_optimization: DeepSpeed cannot read 2 here"),
    "deepspeeds_own_check": (
        ["communication_data_type=fp8"],
        "communication_data_type: Invalid communication_data_type. Supported data types: ['fp16', 'bf16', 'fp32']",
    ),
    "removed_zero_field": (
        ["zero_optimization.mics_shard_size=2"],
        "zero_optimization: MiCS ZeRO-3 sharding has been removed",
    ),
    "optimizer_typo": (
        ["optimizer.type=Adamz"],
        "unknown optimizer.type 'Adamz' (did you mean 'adam'?): DeepSpeed 0.19.8 builds adagrad, adam, adamw",
    ),
    "optimizer_case_of_torch": (["optimizer.type=sgd"], "unknown optimizer.type 'sgd' (did you mean 'SGD'?)"),
    "optimizer_without_type": (["optimizer.type=null"], "optimizer.type is not set: DeepSpeed 0.19.8 builds"),
    "scheduler_typo": (
        ["scheduler.type=WarmupCosine"],
        "unknown scheduler.type 'WarmupCosine' (did you mean 'WarmupCosineLR'?): DeepSpeed 0.19.8 builds LRRangeTest",
    ),
    # What DeepSpeed would have ignored or failed on only once the engine was being built:
    "optimizer_argument_typo": (
        ["optimizer.params.lrr=0.1"],
        "optimizer.params.lrr: optimizer AdamW takes no such argument (did you mean 'lr'? it takes ",
    ),
    "torch_optimizer_argument_typo": (
        ["optimizer.type=SGD", 'optimizer.params={"lr": 0.1, "momentun": 0.9}'],
        "optimizer.params.momentun: optimizer SGD takes no such argument (did you mean 'momentum'?",
    ),
    "max_grad_norm": (["optimizer.params.max_grad_norm=1"], "set gradient_clipping instead"),
    "scheduler_argument_typo": (
        ["scheduler.type=WarmupCosineLR", "scheduler.params.warmup_num_stepz=3"],
        "scheduler.params.warmup_num_stepz: scheduler WarmupCosineLR takes no such argument (did you mean "
        "'warmup_num_steps'?",
    ),
    "top_level_value_of_the_wrong_type": (
        ["gradient_clipping=abc"],
        "gradient_clipping: must be a number (DeepSpeed's default is 1.0), got 'abc'",
    ),
    "a_string_for_a_bool": (
        ["wall_clock_breakdown=no"],
        "wall_clock_breakdown: must be true or false (DeepSpeed's default is False), got 'no'",
    ),
    "field_typo_in_a_section_read_without_pydantic": (
        ["flops_profiler.enabeld=true"],
        "flops_profiler.enabeld: unknown field (did you mean 'enabled'?)",
    ),
    "field_typo_in_activation_checkpointing": (
        ["activation_checkpointing.partition_activatons=true"],
        "activation_checkpointing.partition_activatons: unknown field (did you mean 'partition_activations'?)",
    ),
    "field_of_the_wrong_type_in_a_plain_section": (
        ["activation_checkpointing.cpu_checkpointing=1"],
        "activation_checkpointing.cpu_checkpointing: must be true or false (DeepSpeed's default is False), got 1",
    ),
    "field_renamed_by_deepspeed": (
        ["aio.thread_count=1"],
        "aio.thread_count: unknown field (DeepSpeed 0.19.8 reads block_size, intra_op_parallelism,",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_in_one_line(tmp_path, case):
    overrides, message = CASES[case]
    assert message in refused(tmp_path, BASE, *overrides)


PYDANTIC_SECTIONS = [  # the sections DeepSpeed 0.19.8 builds pydantic models from (smoe_ds.config.deepspeed_keys)
    "zero_optimization",
    "fp16",
    "bf16",
    "bfloat16",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "comms_logger",
    "compile",
    "hybrid_engine",
    "tensor_parallel",
    "weight_quantization",
]


@pytest.mark.parametrize("section", PYDANTIC_SECTIONS)
def test_every_pydantic_section_refuses_an_unknown_field_by_its_path(tmp_path, section):
    assert refused(tmp_path, {**BASE, section: {"xyzzy": 1}}).startswith(f"{section}.xyzzy: unknown field (")


def test_two_errors_in_a_section_name_the_first_and_count_the_rest(tmp_path):
    message = refused(tmp_path, {**BASE, "zero_optimization": {"stagee": 2, "overlap_com": True}})
    assert message == "zero_optimization.stagee: unknown field (did you mean 'stage'?) (and 1 more)"


def test_unknown_field_with_nothing_close_says_where_to_look(tmp_path):
    assert refused(tmp_path, BASE, "zero_optimization.xyzzy=1") == (
        "zero_optimization.xyzzy: unknown field (see the fields of DeepSpeed's DeepSpeedZeroConfig, "
        "https://www.deepspeed.ai/docs/config-json/)"
    )
    assert refused(tmp_path, BASE, "bf16.xyzzy=1").startswith("bf16.xyzzy: unknown field (known fields: ")


def test_trainer_section_given_to_the_finetuner(tmp_path):
    message = refused(tmp_path, {**BASE, "model": {"d_model": 64}}, "hf.model=m", "data.train=t", cls=FinetuneConfig)
    assert (
        message
        == "'model' is a section of smoe_ds.train's config, not of this one, whose sections are hf, moe, data, run"
    )


@pytest.mark.parametrize("name", ["adamw", "AdamW", "ADAM", "lamb", "SGD", "RMSprop"])
def test_optimizers_deepspeed_builds_pass(tmp_path, name):
    assert load(tmp_path, BASE, f"optimizer.type={name}").deepspeed["optimizer"]["type"] == name


@pytest.mark.parametrize("name", ["WarmupLR", "WarmupDecayLR", "OneCycle", "StepLR", "CosineAnnealingLR"])
def test_schedulers_deepspeed_builds_pass(tmp_path, name):
    load(tmp_path, {**BASE, "scheduler": {"type": name, "params": {}}})


def test_the_users_sections_are_left_as_they_were(tmp_path):
    # DeepSpeed's parser adds keys to some of the dicts it reads; the check parses copies.
    data = {**BASE, "data_efficiency": {"enabled": False}}
    assert load(tmp_path, data).deepspeed["data_efficiency"] == {"enabled": False}


# -- through the command line: one line, exit code 2, no run folder -----------------------------------

CLI_CASES = ["typo_of_a_section", "field_typo", "bad_type", "optimizer_typo", "scheduler_typo"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_refused_by_the_trainer_before_it_writes_anything(tmp_path, case):
    overrides, message = CASES[case]
    refuse(tmp_path / "run", message, *sets(*overrides))
