"""The built-in model as an encoder (model.objective masked_lm), in-process: attention sees both ways,
padding is masked out, the loss scores only the masked positions, and the Hugging Face classes
that load an encoder export."""

import pytest
import torch

from smoe_ds.config.schema import ModelConfig, MoEConfig
from smoe_ds.models.lm import build_model
from smoe_ds.models.transformers_lm import (
    SMoEConfig,
    SMoEForCausalLM,
    SMoEForMaskedLM,
    SMoEForSequenceClassification,
    SMoEModel,
)
from smoe_ds.moe.layer import set_active_experts

MODEL = {"vocab_size": 50, "d_model": 16, "n_layers": 2, "n_heads": 2, "block_size": 12}
MOE = {"num_experts": 4, "d_expert": 8}


def lm(objective: str):
    model = build_model(ModelConfig(**MODEL, objective=objective), MoEConfig(**MOE), for_deepspeed=False)
    set_active_experts(model, 2)
    return model.eval()


def test_the_encoder_sees_later_tokens_and_the_decoder_does_not():
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50
    for objective, moves in (("masked_lm", True), ("causal_lm", False)):
        model = lm(objective)
        with torch.no_grad():
            first = model.hidden_states(ids)[0][0, 0]
            again = model.hidden_states(changed)[0][0, 0]
        assert (not torch.allclose(first, again)) == moves, objective


def test_padding_masked_out_leaves_the_real_tokens_states_unchanged():
    model = lm("masked_lm")
    ids = torch.randint(1, 50, (1, 7), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        alone = model.hidden_states(ids)[0]
        with_pads = model.hidden_states(padded, mask)[0][:, :7]
        unmasked = model.hidden_states(padded)[0][:, :7]
    assert torch.allclose(alone, with_pads, atol=1e-5) and not torch.allclose(alone, unmasked, atol=1e-3)


def test_the_loss_scores_only_the_masked_positions():
    model = lm("masked_lm")
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7] = 5, 9
    with torch.no_grad():
        out = model(ids, labels)
        full = model(ids).logits
    assert out.logits.shape == (2, 50)  # the two scored positions' logits
    expected = torch.nn.functional.cross_entropy(torch.stack([full[0, 3], full[1, 7]]), torch.tensor([5, 9]))
    assert torch.allclose(out.lm_loss, expected, atol=1e-6)


def test_hugging_face_classes_by_objective(tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    import smoe_ds  # noqa: F401

    config = SMoEConfig(model={**MODEL, "objective": "masked_lm"}, moe=MOE)
    SMoEForMaskedLM(config).save_pretrained(tmp_path)
    masked = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(masked, SMoEForMaskedLM) and isinstance(base, SMoEModel)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(masked(input_ids=ids, attention_mask=mask).logits, masked.lm.lm_head(hidden), atol=1e-6)
        clf = SMoEForSequenceClassification.from_pretrained(tmp_path, num_labels=2).eval()
        assert torch.allclose(clf(input_ids=ids).logits, clf.score(hidden[:, 0]), atol=1e-6)  # pooled at [CLS]
    with pytest.raises(ValueError, match="is an encoder"):
        SMoEForCausalLM(config)
    with pytest.raises(ValueError, match="is a causal LM"):
        SMoEForMaskedLM(SMoEConfig(model=MODEL, moe=MOE))
