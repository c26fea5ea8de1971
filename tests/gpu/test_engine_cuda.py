"""A 1-GPU DeepSpeed engine (ep_size 1, ZeRO-2, bf16) under the deepspeed launcher: it trains,
checkpoints, and its export runs single-GPU inference at every k with the engine's logits."""

import torch

from smoe_ds.checkpoint.export import convert
from smoe_ds.inference import load_model
from tests.gpu.common import DEVICE, MARKS, REL_TOL, rel_error
from tests.helpers.launch import run_ranks

pytestmark = MARKS


def test_one_gpu_bf16_zero2_engine_trains_checkpoints_and_its_export_gives_the_engines_logits(tmp_path):
    run_ranks("deepspeed", 1, ["tests.helpers.workers.gpu_engine", str(tmp_path)], module=True, timeout=300)
    saved = torch.load(tmp_path / "engine.pt")
    assert saved["device"].split(":")[0] == DEVICE.type
    losses = saved["losses"]
    assert losses[-1] < 0.8 * losses[0], losses

    convert(tmp_path / "checkpoints", tmp_path / "export")
    # The export holds the fp32 master weights; the engine ran their bf16 copies, so the logits
    # agree to bf16 rounding (REL_TOL in common.py), not bit for bit.
    model = load_model(tmp_path / "export", DEVICE)
    for k, logits in saved["logits"].items():
        model.set_active_experts(k)
        with torch.no_grad():
            mine = model(saved["probe"].to(DEVICE)).logits.float().cpu()
        assert rel_error(mine, logits) <= REL_TOL[torch.bfloat16], k
