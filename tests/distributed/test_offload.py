"""ZeRO-Offload with expert parallelism: ZeRO-2 with the optimizer on the CPU (DeepSpeed's
DeepSpeedCPUAdam, as on a GPU machine) trains like ZeRO-2 without offload."""

import json

from tests.helpers.launch import run_ranks
from tests.helpers.resume_runs import args_for, losses

STEPS = 20


def test_zero2_optimizer_offload_at_ep_size_2_gives_the_losses_of_zero2(tmp_path):
    plain, offload = tmp_path / "plain", tmp_path / "offload"
    run_ranks("deepspeed", 2, args_for(plain, f"run.max_steps={STEPS}"), module=True)
    cpu_adam = ['zero_optimization.offload_optimizer={"device": "cpu"}', "optimizer.params.torch_adam=false"]
    proc = run_ranks("deepspeed", 2, args_for(offload, f"run.max_steps={STEPS}", *cpu_adam), module=True)
    assert "ZeRO stage 2, DeepSpeedCPUAdam (optimizer state offloaded to the CPU)" in proc.stdout
    config = json.loads((offload / "config.json").read_text())
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    # Torch's AdamW and DeepSpeedCPUAdam compute the same update with their float operations in
    # another order: the losses agree to rounding that accumulates over the steps (seen: 1.2e-7).
    a, b = losses(plain), losses(offload)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= 1e-5, worst
