import json

import pytest

from smoe_ds.config.schema import ConfigError, apply_override, load_config
from smoe_ds.finetuning.config import FinetuneConfig
from tests.helpers.launch import REPO

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def write(tmp_path, data, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


BASE = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def test_every_shipped_config_loads():
    assert CONFIGS, "no configs in ds_configs/"
    for path in CONFIGS:
        if path.name.startswith("finetune_"):  # smoe_ds.finetune's: the model and data come from --set
            cfg = load_config(str(path), ["hf.model=m", "data.path=t", "data.validation=v"], cls=FinetuneConfig)
            assert cfg.moe.k_schedule.k_max <= cfg.moe.num_experts
        else:
            cfg = load_config(str(path))
            assert cfg.moe.k_schedule.k_max <= cfg.moe.num_experts


def test_defaults_resolve_from_other_keys(tmp_path):
    cfg = load_config(write(tmp_path, {**BASE, "moe": {"num_experts": 16}, "run": {"max_steps": 77}}))
    ks = cfg.moe.k_schedule
    assert (ks.k_min, ks.k_max, ks.end_step) == (8, 16, 77)
    assert cfg.run.eval_ks == [1, 2, 4, 8, 16]


def test_set_overrides_nested_and_deepspeed_keys(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(
        path, ["moe.k_schedule.kind=cosine", "train_micro_batch_size_per_gpu=4", "data.path=x.txt", "run.eval_ks=[1,2]"]
    )
    assert cfg.moe.k_schedule.kind == "cosine"
    assert cfg.deepspeed["train_micro_batch_size_per_gpu"] == 4
    assert cfg.data.path == "x.txt" and cfg.run.eval_ks == [1, 2]


def test_scheduler_auto_steps_take_run_max_steps(tmp_path):
    data = {
        **BASE,
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto"}},
        "run": {"max_steps": 123},
    }
    assert load_config(write(tmp_path, data)).deepspeed["scheduler"]["params"]["total_num_steps"] == 123


@pytest.mark.parametrize(
    "sets, message",
    [
        (["moe.bogus=1"], "unknown config key moe.bogus"),
        (["moe.k_schedule.kmax=3"], "unknown config key moe.k_schedule.kmax"),
        (['moe.num_experts="8"'], "moe.num_experts must be int"),
        (['moe.capacity_factor="big"'], "moe.capacity_factor must be float, got str"),
        (["moe.num_experts=6", "moe.ep_size=4"], r"moe.num_experts \(6\) is not divisible by moe.ep_size \(4\)"),
        (["moe.num_experts=8", "moe.k_schedule.k_max=9"], r"k_max \(9\) must be in \[1, num_experts=8\]"),
        (["moe.k_schedule.k_min=0"], r"k_min \(0\) must be in \[1"),
        (["moe.k_schedule.start_step=10", "moe.k_schedule.end_step=5"], "end_step .5. is before start_step"),
        (["optimizer.params.lr=-0.1"], "optimizer.params.lr must be >= 0"),
        (["zero_optimization.stage=3", "moe.mode=learned"], "stage 3 does not support moe.mode learned"),
        (["zero_optimization.stage=4"], "zero_optimization.stage: must be 0, 1, 2 or 3, got 4"),
        (["fp16.enabled=true", "bf16.enabled=true"], "both true"),
        (["model.positions=alibi"], "model.positions"),
        (["moe.mode=switch"], "moe.mode must be one of"),
        (["run.eval_ks=[0,2]"], "run.eval_ks has values outside"),
        (["run.heap_trim_interval=-1"], "run.heap_trim_interval must be >= 0"),
        (["moe.ep_exchange=experts"], "moe.ep_exchange must be one of tokens, weights, got 'experts'"),
        (["nokey"], "--set expects KEY=VALUE"),
    ],
)
def test_bad_values_raise_one_line_naming_the_key(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, BASE), sets)
    assert "\n" not in str(info.value)


# The trainer's refusals that loading the config already makes, with the whole line it prints (moved
# here from tests/test_cli_errors.py, which ran a trainer process for each; it keeps one of them on the
# command line, and the checks that come after loading).
TRAINER_CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny.json")
WHOLE_MESSAGES = {  # --set overrides on tests/configs/e2e_tiny.json at ep_size 1 -> the message
    "wrong_type": (["moe.num_experts=four"], "moe.num_experts must be int, got str 'four'"),
    "set_without_equals": (["moe.num_experts"], "--set expects KEY=VALUE, got 'moe.num_experts'"),
    "k_max_above_n": (["moe.k_schedule.k_max=5"], "moe.k_schedule.k_max (5) must be in [1, num_experts=4]"),
    "k_min_below_1": (["moe.k_schedule.k_min=0"], "moe.k_schedule.k_min (0) must be in [1, num_experts=4]"),
    "k_schedule_ends_before_it_starts": (
        ["moe.k_schedule.start_step=20", "moe.k_schedule.end_step=10"],
        "moe.k_schedule.end_step (10) is before start_step (20)",
    ),
    "eval_ks_outside_1_to_n": (["run.eval_ks=[1,8]"], "run.eval_ks has values outside [1, num_experts=4]: [8]"),
    "max_steps_zero": (["run.max_steps=0"], "run.max_steps must be >= 1, got 0"),
    "negative_lr": (["optimizer.params.lr=-0.001"], "optimizer.params.lr must be >= 0, got -0.001"),
    "fp16_and_bf16": (
        ["fp16.enabled=true", "bf16.enabled=true"],
        "fp16.enabled and bf16.enabled are both true; choose one",
    ),
    "zero3_with_the_learned_router": (
        ["zero_optimization.stage=3", "moe.mode=learned"],
        "zero_optimization.stage 3 does not support moe.mode learned",
    ),
}


@pytest.mark.parametrize("case", sorted(WHOLE_MESSAGES))
def test_the_trainers_config_refusals_in_whole(case):
    overrides, message = WHOLE_MESSAGES[case]
    with pytest.raises(ConfigError) as info:
        load_config(TRAINER_CONFIG, ["moe.ep_size=1", *overrides])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_json_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, '{\n  "train_micro_batch_size_per_gpu": 2,\n  "model": {"d_model": 64,}\n}')
    with pytest.raises(ConfigError, match="invalid JSON at line 3"):
        load_config(path)


def test_apply_override_refuses_to_descend_into_a_value():
    raw = {"moe": 3}
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(raw, "moe.k=2")


def test_world_size_must_divide_by_ep_size(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["moe.ep_size=4", "moe.num_experts=8"])
    cfg.validate_for_world(8)
    with pytest.raises(ConfigError, match=r"world size \(2\) is not divisible by moe.ep_size \(4\)"):
        cfg.validate_for_world(2)


def test_batch_sizes_must_multiply_out(tmp_path):
    cfg = load_config(write(tmp_path, {**BASE, "train_batch_size": 10, "gradient_accumulation_steps": 1}))
    with pytest.raises(ConfigError, match="train_batch_size .10. !="):
        cfg.validate_for_world(2)


def test_math_word_problems_need_a_validation_file():
    path = str(REPO / "ds_configs" / "finetune_minilm_mwp.json")
    with pytest.raises(ConfigError, match="math_word_problem needs data.validation"):
        load_config(path, ["hf.model=m", "data.path=t"], cls=FinetuneConfig)
