"""Distributed checkpoints -> one file -> single-device model that matches the engine."""

import json

import pytest
import torch

from smoe_ds.checkpoint import CheckpointError
from smoe_ds.checkpoint.export import convert
from smoe_ds.inference import load_model
from tests.helpers.launch import REPO, run_ranks
from tests.helpers.malicious import RunsCode

TOL = 1e-5
# (launcher, world size, ep_size, ZeRO stage): every stage 0-2 with ep_size 1 and 2, and ZeRO-3 on 4
# ranks at ep_size 2, where each expert is partitioned over its 2-rank expert-data-parallel group
LAYOUTS = [
    ("deepspeed", 4, 2, 3),
    ("python", 1, 1, 0),
    ("torchrun", 2, 2, 0),
    ("torchrun", 2, 1, 1),
    ("torchrun", 2, 2, 1),
    ("deepspeed", 2, 1, 2),
    ("torchrun", 2, 2, 2),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(world, ep_size, zero) -> the folder holding the checkpoint and the engine's logits."""
    runs = {}
    for launcher, world, ep, zero in LAYOUTS:
        out = tmp_path_factory.mktemp(f"ws{world}_ep{ep}_z{zero}")
        run_ranks(launcher, world, ["tests.helpers.workers.export_logits", str(out), str(ep), str(zero)], module=True)
        runs[(world, ep, zero)] = out
    return runs


@pytest.mark.parametrize("key", [layout[1:] for layout in LAYOUTS])
def test_single_device_logits_equal_the_distributed_ones(exported, key, tmp_path):
    out = exported[key]
    convert(out / "checkpoints", tmp_path / "export")
    saved = torch.load(out / "logits.pt")
    model = load_model(tmp_path / "export")
    for k, logits in saved["logits"].items():
        model.set_active_experts(k)
        with torch.no_grad():
            mine = model(saved["probe"]).logits
        assert (mine - logits).abs().max() <= TOL, (key, k)


def test_convert_cli_writes_safetensors_and_the_training_config_and_summarises(exported, tmp_path):
    ckpt = exported[(2, 2, 2)] / "checkpoints"
    proc = run_ranks("python", 1, ["smoe_ds.convert", str(ckpt), str(tmp_path / "export")], module=True)
    assert f"read {ckpt / 'step5'} (step 5, smoe_dropout, saved with ep_size 2; fp32 masters from 2 ZeRO shards)" in (
        proc.stdout
    )
    assert f"wrote {tmp_path / 'export' / 'model.safetensors'}" in proc.stdout
    size_mib = (tmp_path / "export" / "model.safetensors").stat().st_size / 2**20
    summary = [line for line in proc.stdout.splitlines() if "parameters, N = 4 experts, router seed 1234" in line]
    assert len(summary) == 1 and "MiB on disk" in summary[0], proc.stdout
    assert abs(float(summary[0].split("MiB")[0].split()[-1]) - size_mib) <= 0.1
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= files  # the byte tokenizer too
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_type"] == "smoe_lm" and cfg["moe"]["num_experts"] == 4
    assert cfg["moe"]["router_seed"] == 1234 and cfg["moe"]["k_schedule"]["kind"] == "linear"
    assert "ep_size" not in cfg["moe"] and cfg["trained_steps"] == 5


def test_hf_round_trip_identical_logits_and_generate(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    import smoe_ds  # noqa: F401

    model = convert(exported[(1, 1, 0)] / "checkpoints", tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    probe = torch.randint(0, 256, (1, 12))
    for k in (1, 2, 4):
        model.set_active_experts(k)
        again.set_active_experts(k)
        with torch.no_grad():
            assert torch.equal(model.eval()(probe).logits, again(probe).logits)
    generated = again.generate(probe, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 20)


def test_generate_cli_prints_text(exported, tmp_path):
    convert(exported[(1, 1, 0)] / "checkpoints", tmp_path / "export")
    proc = run_ranks(
        "python",
        1,
        ["smoe_ds.generate", str(tmp_path / "export"), "--k", "2", "--prompt", "def ", "--max-new-tokens", "16"],
        module=True,
    )
    # DeepSpeed may log its accelerator choice first; the text is the prompt and 16 more bytes
    text = proc.stdout[proc.stdout.index("\ndef ") + 1 :] if not proc.stdout.startswith("def ") else proc.stdout
    assert text.startswith("def ") and len(text.rstrip("\n")) > len("def ")


def corrupt_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_truncated_and_mismatched_checkpoints_name_the_file(exported, tmp_path):
    src = exported[(2, 2, 2)] / "checkpoints"
    tag = "step5"
    a = corrupt_copy(src, tmp_path / "missing")
    (a / tag / "layer_1_expert_3_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file: .*layer_1_expert_3_mp_rank_00"):
        convert(a, tmp_path / "o1")
    b = corrupt_copy(src, tmp_path / "truncated")
    f = b / tag / "layer_0_expert_1_mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read checkpoint file .*layer_0_expert_1_mp_rank_00"):
        convert(b, tmp_path / "o2")
    c = corrupt_copy(src, tmp_path / "wrong_n")
    (c / tag / "layer_0_expert_4_mp_rank_00_model_states.pt").write_bytes(
        (c / tag / "layer_0_expert_3_mp_rank_00_model_states.pt").read_bytes()
    )
    with pytest.raises(CheckpointError, match="layer_0_expert_4.*disagree on the number of experts"):
        convert(c, tmp_path / "o3")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        convert(tmp_path / "nothing", tmp_path / "o4")
    d = corrupt_copy(src, tmp_path / "unfinished")  # a tag whose ranks never all finished saving
    (d / tag / "smoe_ds_meta.json").unlink()
    with pytest.raises(CheckpointError, match=f"{d / tag} is an incomplete save"):
        convert(d / tag, tmp_path / "o5")
    with pytest.raises(CheckpointError, match="names 'step5', which is not a complete checkpoint"):
        convert(d, tmp_path / "o6")


def poisoned_copy(exported, tmp_path, name: str):
    """A copy of a real checkpoint whose file ``name`` also carries code: (folder, file, marker)."""
    ckpt = corrupt_copy(exported[(2, 2, 2)] / "checkpoints", tmp_path / "ckpt")
    path = ckpt / "step5" / name
    state = torch.load(path, weights_only=False)  # our own file, written by the test's engine
    marker = tmp_path / "the_code_ran"
    torch.save({**state, "payload": RunsCode(marker)}, path)
    return ckpt, path, marker


UNSAFE = "it holds posix.system, which is not a type smoe-ds or DeepSpeed writes"


@pytest.mark.parametrize(
    "name", ["layer_1_expert_2_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
)
def test_a_checkpoint_file_carrying_code_is_refused_and_the_code_never_runs(exported, tmp_path, name):
    ckpt, path, marker = poisoned_copy(exported, tmp_path, name)
    with pytest.raises(CheckpointError, match=f"refusing {path}: {UNSAFE}"):
        convert(ckpt, tmp_path / "export")
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_the_convert_cli_refuses_a_code_carrying_model_file_in_one_line(exported, tmp_path):
    ckpt, path, marker = poisoned_copy(exported, tmp_path, "mp_rank_00_model_states.pt")
    proc = run_ranks("python", 1, ["smoe_ds.convert", str(ckpt), str(tmp_path / "export")], module=True, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("smoe-ds: error:")]
    assert proc.returncode == 2 and errors == [f"smoe-ds: error: refusing {path}: {UNSAFE} (loading it could run code)"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not marker.exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"world_size": "two"}, ": 'world_size' must be int, got 'two'"),
        ({"ep_size": 0}, ": 'ep_size' must be at least 1, got 0"),
        ({"config": 5}, ": 'config' must be dict, got 5"),
        ({"trainer_state": [1]}, ": 'trainer_state' must be an object, got [1]"),
        ({"step": None}, ": 'step' must be int, got None"),
        ({"config": "DELETE"}, " has no 'config'"),
    ],
)
def test_a_malformed_meta_file_is_refused_naming_it(exported, tmp_path, edit, message):
    ckpt = corrupt_copy(exported[(2, 2, 2)] / "checkpoints", tmp_path / "ckpt")
    meta_path = ckpt / "step5" / "smoe_ds_meta.json"
    meta = {**json.loads(meta_path.read_text()), **edit}
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if v != "DELETE"}))
    with pytest.raises(CheckpointError) as refused:
        convert(ckpt, tmp_path / "export")
    assert str(refused.value) == f"{meta_path}{message}"


def test_convert_cli_reports_errors_in_one_line(tmp_path):
    proc = run_ranks(
        "python", 1, ["smoe_ds.convert", str(tmp_path / "none"), str(tmp_path / "out")], module=True, check=False
    )
    assert proc.returncode == 2 and "smoe-ds: error: checkpoint folder not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_cli_on_an_export_reports_loss_and_tokens_per_second_per_k(exported, tmp_path):
    convert(exported[(2, 2, 2)] / "checkpoints", tmp_path / "export")
    text = tmp_path / "mine.txt"  # the user's own text (--data): the README, repeated to fill the batches
    text.write_text((REPO / "README.md").read_text() * 4)
    proc = run_ranks(
        "python",
        1,
        [
            "smoe_ds.evaluate",
            str(tmp_path / "export"),
            "--ks",
            "1,2,4",
            "--batches",
            "2",
            "--data",
            str(text),
            "--out",
            str(tmp_path / "eval"),
        ],
        module=True,
    )
    assert "tokens/s" in proc.stdout and str(text) in proc.stdout
    rows = json.loads((tmp_path / "eval" / "self_slimming.json").read_text())["results"]
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert all(r["tokens_per_s"] > 0 and 0 < r["bpb"] < 9 for r in rows)
    assert (tmp_path / "eval" / "self_slimming.png").is_file()
    bad = run_ranks("python", 1, ["smoe_ds.evaluate", str(tmp_path / "export"), "--ks", "5"], module=True, check=False)
    assert bad.returncode == 2 and "--ks values must be in [1, 4], got [5]" in bad.stderr


def test_bf16_run_exports_the_fp32_masters_from_the_zero_shards(tmp_path):
    from safetensors.torch import load_file

    from smoe_ds.checkpoint import read_model, resolve_tag_dir

    config = str(REPO / "tests" / "configs" / "e2e_tiny.json")
    sets = ["bf16.enabled=true", "run.max_steps=5", "run.eval_interval=0", f"run.out_dir={tmp_path}"]
    run_ranks("torchrun", 2, ["smoe_ds.train", "--config", config] + sum([["--set", s] for s in sets], []), module=True)
    convert(tmp_path / "checkpoints", tmp_path / "export")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    _, module, _ = read_model(resolve_tag_dir(tmp_path / "checkpoints"))
    qkv = "blocks.0.attn.qkv.weight"
    assert module[qkv].dtype == torch.bfloat16 and exported[f"lm.{qkv}"].dtype == torch.float32
    # the bf16 weights the engine ran with are the fp32 masters rounded; the export keeps the fp32 bits
    assert torch.equal(exported[f"lm.{qkv}"].to(torch.bfloat16), module[qkv])
    assert not torch.equal(exported[f"lm.{qkv}"], module[qkv].float())
    expert = exported["lm.blocks.0.ffn.deepspeed_moe.experts.w_in"]  # [N, H, D], all 4 experts from both ranks
    assert expert.shape == (4, 32, 64) and expert.dtype == torch.float32
    assert torch.equal(
        expert[3].to(torch.bfloat16), module["blocks.0.ffn.deepspeed_moe.experts.deepspeed_experts.3.w_in.weight"]
    )


def test_single_device_inference_imports_neither_deepspeed_nor_a_process_group(exported, tmp_path):
    convert(exported[(2, 2, 2)] / "checkpoints", tmp_path / "export")
    script = (
        "import sys, torch\n"
        "from smoe_ds.inference import load_model\n"
        f"m = load_model({str(tmp_path / 'export')!r}, 'cpu', k=2)\n"
        "m.generate(torch.tensor([[100, 101]]), max_new_tokens=3, do_sample=False)\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
        "assert not torch.distributed.is_initialized()\n"
        "print('clean')\n"
    )
    proc = run_ranks("python", 1, ["-c", script])
    assert proc.stdout.strip().endswith("clean")


def test_the_router_comes_from_the_checkpoint_whatever_its_init_or_the_config_says(exported, tmp_path):
    """The runs above drew their routers with the std of 1/sqrt(d_model) (router_init_std null, the
    only init before the key existed). An export, an export whose config predates the key, one whose
    config names another std, and a resumed engine built with another std all get those routers."""
    from smoe_ds.moe.layer import moe_layers
    from smoe_ds.moe.router import frozen_router_weight

    ckpt = exported[(1, 1, 0)] / "checkpoints"
    trained = [frozen_router_weight(32, 4, 1234, i) for i in range(2)]  # tiny_config: d_model 32, 4 experts
    export = tmp_path / "export"
    convert(ckpt, export)
    config_path = export / "config.json"
    cfg = json.loads(config_path.read_text())
    assert cfg["moe"]["router_init_std"] is None

    def routers():
        return [layer.deepspeed_moe.gate.wg.weight for layer in moe_layers(load_model(export))]

    assert all(torch.equal(a, b) for a, b in zip(routers(), trained, strict=True))
    del cfg["moe"]["router_init_std"]  # an export written before the key existed
    config_path.write_text(json.dumps(cfg))
    assert all(torch.equal(a, b) for a, b in zip(routers(), trained, strict=True))
    cfg["moe"]["router_init_std"] = 0.02  # the config disagrees with the weights: the weights win
    config_path.write_text(json.dumps(cfg))
    assert all(torch.equal(a, b) for a, b in zip(routers(), trained, strict=True))
    assert not torch.equal(trained[0], frozen_router_weight(32, 4, 1234, 0, 0.02))

    out = tmp_path / "restored.pt"
    run_ranks("python", 1, ["tests.helpers.workers.router_restore", str(ckpt), str(out), "0.02"], module=True)
    restored = torch.load(out)
    assert all(torch.equal(a, b) for a, b in zip(restored, trained, strict=True))
