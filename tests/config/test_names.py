"""The same thing has the same name in every command, and every command named is installed.

The training data is ``data.path`` (the fine-tuner's ``data.train`` before), a list of k is
``--ks`` and one k ``--k``, a rank count ``--ranks`` (the experiments' ``--nproc`` before). Each
old spelling still works and says so in one line; the new one says nothing. All in process:
config loading, and each command's real argument parser stopped right after parsing.
"""

from __future__ import annotations

import importlib
import re

import pytest

from smoe_ds.config import renamed
from smoe_ds.config.schema import ConfigError, load_config
from smoe_ds.finetuning.config import FinetuneConfig
from smoe_ds.inference import set_active_experts
from smoe_ds.moe.layer import moe_layers
from tests.helpers.launch import REPO
from tests.test_readme import DOCS, entry_points, parse_module

SST2 = str(REPO / "ds_configs" / "finetune_minilm_sst2.json")
# smoe-ds itself and its threads' names (smoe-ds-peer-watchdog) are not commands.
COMMAND = re.compile(r"\bsmoe-(?!ds\b|ds-)[a-z][a-z0-9-]*[a-z0-9]")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts as a new rank-0 process: nothing warned yet, no launcher rank set."""
    monkeypatch.setattr(renamed, "_warned", set())
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(var, raising=False)


def test_every_smoe_command_named_in_the_code_and_the_docs_is_installed():
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "smoe_ds").rglob("*.py"))]
    texts += [p.read_text(encoding="utf-8") for p in DOCS]
    named = {m for text in texts for m in COMMAND.findall(text)}
    installed = entry_points()
    assert {"smoe-train", "smoe-bench-memory", "smoe-bench-overlap", "smoe-bench-packing"} <= named
    assert named <= set(installed), f"named but not in setup.cfg's console_scripts: {sorted(named - set(installed))}"
    for name, module in installed.items():
        assert callable(importlib.import_module(module).main), name


def finetune_config(*sets: str) -> FinetuneConfig:
    return load_config(SST2, ["hf.model=m", *sets], cls=FinetuneConfig)


def test_the_old_data_train_means_data_path_and_warns_once_in_one_line(capsys):
    cfg = finetune_config("data.train=t.tsv")
    finetune_config("data.train=t.tsv")
    assert cfg.data.path == "t.tsv" and cfg.data.train is None
    assert capsys.readouterr().err == "smoe-ds: warning: data.train is now data.path\n"
    assert "train" not in cfg.to_dict()["data"]  # a saved config holds the new name only


def test_data_path_loads_without_a_warning_and_both_at_once_are_refused(capsys):
    assert finetune_config("data.path=t.tsv").data.path == "t.tsv"
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="data.train is the old name of data.path: set only data.path"):
        finetune_config("data.path=t.tsv", "data.train=u.tsv")


def test_only_rank_0_warns(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert finetune_config("data.train=t.tsv").data.path == "t.tsv"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "sets,column",
    [
        ([], "sentence"),  # classification reads GLUE's column
        (["hf.task=causal_lm"], "text"),  # causal LM reads the trainer's
        (["hf.task=causal_lm", "data.text_column=body"], "body"),
        (["data.text_column=review"], "review"),
    ],
)
def test_the_fine_tuners_text_column_defaults_by_task(sets, column):
    assert finetune_config("data.path=t", *sets).data.text_column == column


@pytest.mark.parametrize("flag,warning", [("--ks", ""), ("--k", "smoe-ds: warning: --k is now --ks\n")])
def test_evaluate_takes_a_list_of_k_as_ks_and_its_old_k_warns(capsys, flag, warning):
    args = parse_module("smoe_ds.evaluate", ["runs/x/export", flag, "1,2,4"])
    assert args.ks == "1,2,4"
    assert capsys.readouterr().err == warning


@pytest.mark.parametrize("module", ["smoe_ds.convert", "smoe_ds.generate"])
def test_convert_and_generate_take_one_k(module):
    argv = ["runs/x/checkpoints", "runs/x/export"] if module == "smoe_ds.convert" else ["runs/x/export"]
    assert parse_module(module, [*argv, "--k", "4"]).k == 4


EXPERIMENTS = {
    "smoe_ds.experiments.paper": ["--out", "o"],
    "smoe_ds.experiments.factors": ["--out", "o"],
    "smoe_ds.experiments.mwp": ["--data", "d", "--out", "o"],
    "smoe_ds.experiments.transfer": ["--pretrained", "p", "--train", "t", "--validation", "v", "--out", "o"],
}


@pytest.mark.parametrize("module", sorted(EXPERIMENTS))
@pytest.mark.parametrize("flag,warning", [("--ranks", ""), ("--nproc", "smoe-ds: warning: --nproc is now --ranks\n")])
def test_the_experiments_take_ranks_as_the_benches_do_and_their_old_nproc_warns(capsys, module, flag, warning):
    assert parse_module(module, [*EXPERIMENTS[module], flag, "3"]).ranks == 3
    assert parse_module(module, EXPERIMENTS[module]).ranks is None  # the default: every GPU, or 2 CPU ranks
    assert capsys.readouterr().err == warning


@pytest.mark.parametrize("module", ["smoe_ds.bench.e2e", "smoe_ds.bench.memory"])
def test_the_benches_take_ranks(module):
    assert parse_module(module, ["--ranks", "2"]).ranks == 2


def test_set_active_experts_is_one_function_for_the_exported_lm_and_records_k_in_its_config():
    from smoe_ds.models.transformers_lm import SMoEConfig, SMoEForCausalLM

    model = SMoEForCausalLM(SMoEConfig(model={"d_model": 32, "n_layers": 2, "n_heads": 2}, moe={"num_experts": 4}))
    set_active_experts(model, 2)
    assert [layer.deepspeed_moe.gate.k for layer in moe_layers(model)] == [2, 2]
    assert model.config.active_experts == 2  # what save_pretrained writes
    model.set_active_experts(3)  # the method, kept for code written against it, is the same function
    assert {layer.deepspeed_moe.gate.k for layer in moe_layers(model)} == {3} and model.config.active_experts == 3
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\], got 5"):
        set_active_experts(model, 5)
