"""``python -m smoe_ds.hf_convert`` end to end on the pretrained MiniLM, and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from smoe_ds.hf import convert_model, load_smoe, save_smoe
from smoe_ds.hf_convert import main
from tests.helpers.hf_models import tiny_model

REPO = Path(__file__).resolve().parents[2]


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "smoe_ds.hf_convert", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_convert_then_densify_minilm(minilm_dir, minilm, minilm_inputs, tmp_path):
    smoe_dir, dense_dir = tmp_path / "smoe", tmp_path / "dense"
    proc = cli(minilm_dir, smoe_dir, "--experts", 4, "--router-seed", 5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "family bert" in proc.stdout and "6 FFN layers" in proc.stdout and "N = 4 experts" in proc.stdout
    assert "22,722,432 parameters (9,216 of them frozen router weights)" in proc.stdout

    with torch.no_grad():
        ref = minilm(**minilm_inputs).last_hidden_state
    smoe = load_smoe(smoe_dir)
    assert smoe.smoe_dropout.router_seed == 5 and smoe.smoe_dropout.weighting == "rescale"
    with torch.no_grad():
        assert (smoe(**minilm_inputs).last_hidden_state - ref).abs().max() <= 1e-5

    proc = cli(smoe_dir, dense_dir, "--densify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense = transformers.AutoModel.from_pretrained(dense_dir).eval()
    assert type(dense).__name__ == "BertModel"
    tokenizer = transformers.AutoTokenizer.from_pretrained(dense_dir)
    assert torch.equal(tokenizer(["a test"], return_tensors="pt")["input_ids"], torch.tensor([[101, 1037, 3231, 102]]))
    with torch.no_grad():
        assert (dense(**minilm_inputs).last_hidden_state - ref).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such model directory"),
        ("smoe_src", "is an SMoE-Dropout directory already"),
        ("indivisible", "hidden size 256 of this gpt2 model is not divisible into 3 experts"),
        ("t5", "model type 't5' is not supported"),
        ("softmax_densify", "cannot densify a 'softmax'"),
        ("no_experts", "--experts N is required"),
        ("densify_with_experts", "--experts is for conversion only"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(case, message, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    if case in ("indivisible", "no_experts", "densify_with_experts"):
        tiny_model("gpt2").save_pretrained(src)
    elif case == "t5":
        config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64)
        transformers.T5Model(config).save_pretrained(src)
    elif case == "smoe_src":
        save_smoe(convert_model(tiny_model("gpt2"), num_experts=4), src)
    elif case == "softmax_densify":
        save_smoe(convert_model(tiny_model("gpt2"), num_experts=4, weighting="softmax"), src)
    options = {
        "missing": ["--experts", "4"],
        "smoe_src": ["--experts", "4"],
        "indivisible": ["--experts", "3"],
        "t5": ["--experts", "2"],
        "softmax_densify": ["--densify"],
        "no_experts": [],
        "densify_with_experts": ["--densify", "--experts", "4"],
    }[case]
    capsys.readouterr()  # drop what the setup printed
    assert main([str(src), str(out), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smoe-ds: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
