"""GroupedExperts' per-expert state-dict layout (what DeepSpeed splits into one file per expert)."""

import pytest
import torch

from smoe_ds.moe.experts import GroupedExperts


@pytest.mark.parametrize(
    "kw, names",
    [
        ({}, {"w_in.weight", "w_out.weight"}),
        ({"bias": True}, {"w_in.weight", "w_in.bias", "w_out.weight"}),
        ({"gated": True}, {"w_in.weight", "w_gate.weight", "w_out.weight"}),
    ],
)
def test_per_expert_state_round_trip(kw, names):
    torch.manual_seed(0)
    src, dst = GroupedExperts(3, 8, 4, "g", **kw), GroupedExperts(3, 8, 4, "g", **kw)
    if src.b_in is not None:
        torch.nn.init.normal_(src.b_in)
    state = src.state_dict()
    assert set(state) == {f"deepspeed_experts.{e}.{n}" for e in range(3) for n in names}
    assert state["deepspeed_experts.1.w_out.weight"].shape == (8, 4)  # nn.Linear(H, D).weight
    dst.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters()))
    assert all(p.allreduce is False and p.group_name == "g" for p in dst.parameters())


def test_gated_experts_with_biases_are_refused():
    with pytest.raises(ValueError, match="gated experts with biases"):
        GroupedExperts(2, 8, 4, "g", bias=True, gated=True)
