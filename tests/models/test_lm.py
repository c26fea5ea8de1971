import pytest
import torch

from smoe_ds.config.schema import ModelConfig, MoEConfig
from smoe_ds.models.lm import build_model, count_parameters
from smoe_ds.moe.experts import global_expert_name


def tiny(positions="rope", mode="smoe_dropout", moe_layers="all"):
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, block_size=24, positions=positions, moe_layers=moe_layers)
    moe = MoEConfig(mode=mode, num_experts=4, d_expert=8)
    moe.k_schedule.k_max = 4
    return build_model(cfg, moe)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_causal_future_tokens_do_not_change_past_logits(positions):
    model = tiny(positions).eval()
    x = torch.randint(0, 256, (1, 20))
    x2 = x.clone()
    x2[0, 15:] = (x2[0, 15:] + 1) % 256
    with torch.no_grad():
        a, b = model(x).logits, model(x2).logits
    assert torch.allclose(a[0, :15], b[0, :15], atol=1e-6)
    assert not torch.allclose(a[0, 15:], b[0, 15:])


def test_moe_layers_every_other():
    from deepspeed.moe.layer import MoE

    model = tiny(moe_layers="every_other")
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [False, True, False]


def test_same_seed_same_weights_and_loss_near_uniform_at_init():
    a, b = tiny(), tiny()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    x = torch.randint(0, 256, (2, 24))
    loss = a(x[:, :-1], x[:, 1:]).loss
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_dense_and_moe_models_have_equal_trainable_parameters():
    moe, dense = tiny(), tiny(mode="dense")
    trainable = sum(p.numel() for p in moe.parameters() if p.requires_grad)
    assert trainable == count_parameters(dense)


def test_global_expert_name_maps_local_expert_ids():
    name = "blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.2.w_in.weight"
    assert global_expert_name(name, ep_rank=3, num_local_experts=4) == name.replace(".2.", ".14.")
    assert global_expert_name("blocks.1.attn.qkv.weight", 3, 4) == "blocks.1.attn.qkv.weight"
