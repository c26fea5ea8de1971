"""The frozen router's init std (moe.router_init_std) and the 1/N full-capacity evaluation."""

import math

import pytest
import torch
import torch.nn.functional as F

from smoe_ds.config.schema import ConfigError, ModelConfig, MoEConfig, config_from_dict
from smoe_ds.models.lm import build_model
from smoe_ds.moe.layer import moe_layers, set_active_experts, uniform_full_capacity
from smoe_ds.moe.router import frozen_router_weight
from tests.moe.test_layer import make_layer

TOL = 1e-5


def test_router_std_is_what_the_config_asks_and_the_draw_is_only_rescaled():
    d, n = 256, 32
    paper = frozen_router_weight(d, n, router_seed=7, layer_index=2, init_std=0.02)
    default = frozen_router_weight(d, n, router_seed=7, layer_index=2)
    assert abs(paper.std().item() / 0.02 - 1) < 0.05
    assert abs(default.std().item() * math.sqrt(d) - 1) < 0.05
    # One draw at two scales: the same top-k for every token, only the softmax's sharpness differs.
    assert torch.allclose(paper, default * 0.02 * math.sqrt(d), atol=1e-7)


@pytest.mark.parametrize("std", [None, 0.02])
def test_the_lm_routers_are_drawn_with_the_configured_std(std):
    model_cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, block_size=16)
    model = build_model(model_cfg, MoEConfig(num_experts=4, d_expert=8, router_init_std=std, router_seed=5), 0, False)
    for i, layer in enumerate(moe_layers(model)):
        assert torch.equal(layer.deepspeed_moe.gate.wg.weight, frozen_router_weight(64, 4, 5, i, std))


@pytest.mark.parametrize("bad", [0.0, -0.02])
def test_a_router_std_that_is_not_positive_is_refused(bad):
    with pytest.raises(ConfigError, match="moe.router_init_std must be positive or null"):
        config_from_dict({"optimizer": {"type": "Adam", "params": {}}, "moe": {"router_init_std": bad}}).resolve()


def test_uniform_weighting_at_full_capacity_is_the_mean_of_all_experts():
    n = 8
    layer = make_layer(n=n)
    set_active_experts(layer, n)
    x_SD = torch.randn(37, 24)
    experts = layer.deepspeed_moe.experts
    mean = sum(F.gelu(x_SD @ experts.w_in[e].t()) @ experts.w_out[e] for e in range(n)) / n
    with torch.no_grad(), uniform_full_capacity(layer) as changed:
        uniform = layer(x_SD[None])[0][0]
    assert changed
    assert (uniform - mean).abs().max() <= TOL
    with torch.no_grad():  # and the router's softmax again after the block: a different average
        softmax = layer(x_SD[None])[0][0]
    assert (softmax - mean).abs().max() > 1e-3
    assert layer.deepspeed_moe.gate.weighting == "softmax"


def test_uniform_weighting_leaves_dense_and_thor_models_alone():
    thor = make_layer(mode="thor")
    with uniform_full_capacity(thor) as changed:
        assert not changed and thor.deepspeed_moe.gate.weighting == "uniform"
    with uniform_full_capacity(torch.nn.Linear(2, 2)) as changed:
        assert not changed
