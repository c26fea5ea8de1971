"""SMoE-Dropout inside a Hugging Face Trainer (``smoe_ds.hf.SMoEDropoutCallback``, ``smoe_ds.hf.trainer_deepspeed``).

In-process: the callback's logic on a tiny converted BERT with a real single-process Trainer (k per
step, k in the logs, per-k evaluation through Trainer's own loop, the refusals), and the optimizer
groups that Trainer's ``optimizer_cls_and_kwargs`` hook takes. On 2 CPU ranks under torchrun,
``launch/hf_trainer_example.py`` with Trainer's own DeepSpeed integration (and once under the deepspeed
launcher):

- the pretrained MiniLM at ZeRO-2 with expert parallelism (ep_size 2): one run shared by the
  learning, logging, router and export checks;
- a tiny GPT-2 at ZeRO-3 (ep_size 1), under the deepspeed launcher: one uninterrupted run shared by
  the learning, stage and export checks, and against it a run (torchrun) whose rank 1 is killed at
  step 6, resumed from its step-4 checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from datasets import Dataset

import smoe_ds  # noqa: F401  (registers the SMoE directories with the Auto classes)
from smoe_ds.config.schema import ConfigError, KScheduleConfig
from smoe_ds.distributed import faults
from smoe_ds.hf import (
    SMoEDropoutCallback,
    convert_for_trainer,
    convert_model,
    optimizer_cls_and_kwargs,
    set_active_experts,
)
from smoe_ds.hf.save import HOW_TO_SAVE_SHARDED
from smoe_ds.hf.surgery import DEFAULT_ROUTER_SEED, active_experts
from smoe_ds.hf.trainer_deepspeed import ready_for_deepspeed
from smoe_ds.hf_convert import main as hf_convert_main
from smoe_ds.moe.layer import moe_layers
from smoe_ds.moe.router import frozen_router_weight
from smoe_ds.moe.schedule import k_at_step
from tests.helpers.corpora import SENTIMENT
from tests.helpers.hf_models import run_plain_transformers
from tests.helpers.launch import REPO, run_ranks
from tests.helpers.workers.hf_trainer_probe import example_module

EXAMPLE = str(REPO / "launch" / "hf_trainer_example.py")
N = 8


def tiny_bert(num_experts: int | None = N, **convert) -> transformers.BertForSequenceClassification:
    """A 2-layer BERT classifier (FFN 64), converted to ``num_experts`` experts unless None."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2
    )
    model = transformers.BertForSequenceClassification(config)
    return model if num_experts is None else convert_model(model, num_experts, **convert)


def tiny_data(n: int = 32) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


def tiny_trainer(tmp_path: Path, model, max_steps: int = 6, callbacks=None) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    data = tiny_data()
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        callbacks=callbacks,
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )


SCHEDULE = KScheduleConfig(k_min=2, k_max=N)  # end_step: the run's max_steps


# -- in-process --------------------------------------------------------------------------


def test_k_follows_the_schedule_of_global_step_and_reaches_every_log(tmp_path):
    trainer = tiny_trainer(tmp_path, tiny_bert())
    callback = SMoEDropoutCallback(SCHEDULE, eval_ks=[1, N]).install(trainer)
    seen = []  # the k every optimizer step ran at, read off the model

    class Probe(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(active_experts(model))

    trainer.add_callback(Probe())
    trainer.train()
    resolved = KScheduleConfig(k_min=2, k_max=N, end_step=6)
    expected = [k_at_step(resolved, step) for step in range(6)]
    assert expected[0] == 2 and expected[-1] < N and expected == sorted(expected), expected
    assert seen == expected
    logged = [(h["step"], h["k"]) for h in trainer.state.log_history if "loss" in h]
    assert logged == [(step + 1, k) for step, k in enumerate(expected)]
    # A resumed run starts at a later global_step: k is the schedule's there, whatever ran before.
    state = transformers.TrainerState(global_step=5)
    callback.on_step_begin(trainer.args, state, trainer.control, model=trainer.model)
    assert active_experts(trainer.model) == k_at_step(resolved, 5)


def test_evaluation_runs_at_every_k_through_trainers_loop_and_restores_the_training_k(tmp_path):
    trainer = tiny_trainer(tmp_path, tiny_bert())
    SMoEDropoutCallback(SCHEDULE, eval_ks=[1, N]).install(trainer)
    set_active_experts(trainer.model, 3)
    metrics = trainer.evaluate()
    assert active_experts(trainer.model) == 3
    names = {key for h in trainer.state.log_history for key in h}
    assert {"eval_accuracy", "eval_k1_accuracy", "eval_k8_accuracy", "eval_k1_loss", "eval_k8_loss"} <= names
    per_k = {k: next(h[f"eval_k{k}_loss"] for h in trainer.state.log_history if f"eval_k{k}_loss" in h) for k in (1, N)}
    assert per_k[1] != per_k[N]  # evaluated at two different k, not twice at one
    assert "eval_k1_loss" not in metrics  # Trainer's own evaluation returns its own metrics only


def test_without_deepspeed_trainer_resumes_from_the_smoe_checkpoint_that_save_pretrained_wrote(tmp_path):
    """Trainer's checkpoint holds the SMoE directory (config and weights), and ``resume_from_checkpoint``
    loads those weights back into the converted model: steps 4-6 log the uninterrupted run's losses."""

    def train(resume: str | None = None) -> dict[int, float]:
        trainer = tiny_trainer(tmp_path, tiny_bert(), max_steps=6)
        trainer.args.save_strategy, trainer.args.save_steps = "steps", 3
        SMoEDropoutCallback(SCHEDULE).install(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return train_losses(trainer.state.log_history)

    whole = train()
    checkpoint = tmp_path / "checkpoint-3"
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "smoe_dropout_hf"
    resumed = train(resume=str(checkpoint))
    assert [resumed[step] for step in (4, 5, 6)] == [whole[step] for step in (4, 5, 6)]
    # the model the checkpoint holds is the one trained for 3 steps, at that step's k
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert active_experts(loaded) == k_at_step(KScheduleConfig(k_min=2, k_max=N, end_step=6), 2)


def refusal(call) -> str:
    with pytest.raises(ConfigError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_refusals_are_one_line(tmp_path):
    dense = tiny_bert(num_experts=None)
    assert "not an SMoE-Dropout model" in refusal(
        lambda: tiny_trainer(tmp_path, dense, callbacks=[SMoEDropoutCallback()])
    )
    too_big = SMoEDropoutCallback(KScheduleConfig(k_min=2, k_max=N + 1))
    assert f"schedule.k_max ({N + 1}) must be in [1, num_experts={N}]" in refusal(
        lambda: tiny_trainer(tmp_path, tiny_bert(), callbacks=[too_big])
    )
    trainer = tiny_trainer(tmp_path, tiny_bert())
    assert "eval_ks must be in [1, num_experts=8]" in refusal(lambda: SMoEDropoutCallback(eval_ks=[9]).install(trainer))
    assert "unknown k schedule key(s) k_top" in refusal(lambda: SMoEDropoutCallback({"k_top": 3}))
    unattached = SMoEDropoutCallback(SCHEDULE, eval_ks=[1])
    trainer = tiny_trainer(tmp_path, tiny_bert(), callbacks=[unattached])
    assert "callback.install(trainer)" in refusal(trainer.train)
    sharded = tiny_bert(ep_size=2, ep_rank=0)  # plain layers
    assert "(ep_size 2) needs Trainer's DeepSpeed integration" in refusal(
        lambda: tiny_trainer(tmp_path, sharded, callbacks=[SMoEDropoutCallback()])
    )
    assert "convert_for_trainer" in refusal(lambda: ready_for_deepspeed(sharded, zero(2)))
    assert "(ep_size 2) needs Trainer's DeepSpeed integration" in refusal(
        lambda: convert_for_trainer(tiny_bert(None), N, tiny_trainer(tmp_path, tiny_bert()).args, ep_size=2)
    )
    passed = SMoEDropoutCallback(SCHEDULE)  # callbacks=[...], not install: save_model could not gather
    state = transformers.TrainerState(max_steps=6)
    assert "saving an expert-parallel model needs the trainer" in refusal(
        lambda: passed.on_train_begin(tiny_trainer(tmp_path, tiny_bert()).args, state, None, model=sharded)
    )
    moe = tiny_bert(ep_size=2, ep_rank=0, for_deepspeed=True)  # DeepSpeed MoE layers
    assert "at ZeRO-0/1/2, not 3" in refusal(lambda: ready_for_deepspeed(moe, zero(3)))
    needs_groups = "needs the experts in optimizer groups of their own"
    assert needs_groups in refusal(lambda: ready_for_deepspeed(moe, {**zero(2), "optimizer": {"type": "AdamW"}}))
    assert needs_groups in refusal(lambda: ready_for_deepspeed(moe, zero(2), optimizer_groups=[]))  # Trainer's own


def zero(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}}


def test_trainers_optimizer_takes_the_experts_groups_and_no_router(tmp_path):
    """Trainer's ``create_optimizer`` (what its DeepSpeed integration calls) builds the optimizer over
    our groups: at ep_size 2 the experts in MoE groups of their own, the frozen routers in none."""
    moe = tiny_bert(ep_size=2, ep_rank=1, for_deepspeed=True)
    args = tiny_trainer(tmp_path, tiny_bert()).args
    trainer = transformers.Trainer(model=moe, args=args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(moe, args))
    groups = trainer.create_optimizer().param_groups
    held = {id(p): g.get("moe", False) for g in groups for p in g["params"]}
    experts = {id(p) for layer in moe_layers(moe) for p in layer.deepspeed_moe.experts.parameters()}
    routers = {id(layer.deepspeed_moe.gate.wg.weight) for layer in moe_layers(moe)}
    trainable = {id(p) for p in moe.parameters() if p.requires_grad}
    assert len(routers) == 2 and not routers & set(held) and set(held) == trainable
    assert {i for i, is_moe in held.items() if is_moe} == experts
    assert {g["lr"] for g in groups} == {args.learning_rate}
    plain = tiny_bert()
    _, kwargs = optimizer_cls_and_kwargs(plain, args)
    assert not any(g.get("moe") for g in kwargs["params"])  # one device holds all experts: no split


# -- 2 ranks, torchrun, Trainer's DeepSpeed -----------------------------------------------------


def example(
    out: Path, *args: str, probe: bool = False, env: dict | None = None, check: bool = True, launcher: str = "torchrun"
):
    """launch/hf_trainer_example.py on 2 ranks under ``launcher`` (``probe``: with
    tests/helpers/workers/hf_trainer_probe.py's callback, which writes what each rank's engine holds)."""
    target = ["tests.helpers.workers.hf_trainer_probe"] if probe else [EXAMPLE]
    argv = [*target, "--out", str(out), "--report_to", "none", *args]
    return run_ranks(launcher, 2, argv, module=probe, timeout=420, env=env, check=check)


def log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def train_losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def assert_k_follows_the_schedule(history: list[dict], steps: int) -> None:
    resolved = KScheduleConfig(k_min=N // 2, k_max=N, end_step=steps)
    logged = [(h["step"], h["k"]) for h in history if "loss" in h]
    assert logged == [(s, k_at_step(resolved, s - 1)) for s in range(1, steps + 1)]


EVERY_K = list(range(1, N + 1))
MINILM_STEPS = 8


@pytest.fixture(scope="module")
def minilm_ep2(tmp_path_factory, minilm_dir) -> Path:
    """The MiniLM fine-tune at ZeRO-2 with expert parallelism (4 experts per rank): 8 steps, k 4 -> 8,
    checkpointed at step 8, evaluated and predicted at every k, saved with ``trainer.save_model``, probed."""
    out = tmp_path_factory.mktemp("hf_trainer") / "minilm_ep2"
    args = ["--task", "classification", "--ep_size", "2", "--max_steps", str(MINILM_STEPS), "--predictions"]
    args += ["--save_steps", str(MINILM_STEPS)]  # Trainer's checkpoint saves the model too
    example(out, *args, "--eval_ks", *map(str, EVERY_K), probe=True)
    return out


# What the 8 steps at lr 1e-3 score on the 72 dev phrases at k = N (37 positive: always answering
# positive scores 0.514, at a loss of ln 2 = 0.693). Measured on 2 CPU ranks at ep_size 2: training loss
# 0.697 at step 1, 0.464 at step 8; at k = 8 accuracy 0.833, loss 0.493.
LEARNED_ACCURACY, LEARNED_LOSS = 0.65, 0.65


def test_expert_parallel_minilm_learns_and_k_follows_the_schedule_in_the_logs(minilm_ep2):
    history = log_history(minilm_ep2)
    final = next(h for h in reversed(history) if f"eval_k{N}_loss" in h)
    assert final[f"eval_k{N}_accuracy"] >= LEARNED_ACCURACY and final[f"eval_k{N}_loss"] <= LEARNED_LOSS, final
    assert final[f"eval_k{N}_loss"] < next(h["loss"] for h in history if "loss" in h)
    assert_k_follows_the_schedule(history, MINILM_STEPS)
    assert {f"eval_k{k}_accuracy" for k in EVERY_K} <= {key for h in history for key in h}


def test_expert_parallel_routers_stay_frozen_identical_and_out_of_the_optimizer(minilm_ep2):
    probes = [torch.load(minilm_ep2 / f"probe_rank{r}.pt") for r in range(2)]
    for probe in probes:
        assert probe["moe_groups"] > 0 and probe["frozen_in_optimizer"] == []
        routers = probe["frozen"]
        assert len(routers) == 6 and all(name.endswith("gate.wg.weight") for name in routers), sorted(routers)
        for i, name in enumerate(sorted(routers, key=lambda n: int(n.split(".layer.")[1].split(".")[0]))):
            assert torch.equal(routers[name], frozen_router_weight(384, N, DEFAULT_ROUTER_SEED, i)), name


def test_a_straight_save_pretrained_of_a_partial_model_is_refused_before_writing(minilm_ep2, gpt2_zero3):
    """``model.save_pretrained`` called as a user might, not through ``trainer.save_model``: a rank that
    holds half the experts (ep_size 2), or ZeRO-3's partitions, would write a model that does not
    reload, so each rank is refused with the way to save, and nothing is written."""
    for run, how in ((minilm_ep2, HOW_TO_SAVE_SHARDED), (gpt2_zero3, "ZeRO-3 partitions this model's weights")):
        for rank in range(2):
            assert how in torch.load(run / f"probe_rank{rank}.pt")["direct_save"]
            assert not (run / f"direct_save_rank{rank}").exists()


def minilm_dev_batch(model_dir: Path) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    sentences = [line.split("\t")[0] for line in (SENTIMENT / "dev.tsv").read_text().splitlines()[1:]]
    return dict(tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=64))


def test_the_expert_parallel_save_pretrained_gives_the_engines_logits_at_every_k(minilm_ep2):
    """``trainer.save_model`` on 2 ranks, each holding 4 of the 8 experts: rank 0's ``save_pretrained``
    writes all 8 (gathered on every rank first), and ``from_pretrained`` runs as the engine at every k."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_ep2 / "model")
    batch = minilm_dev_batch(minilm_ep2 / "model")
    for k in EVERY_K:
        set_active_experts(model, k)
        engine = torch.from_numpy(np.load(minilm_ep2 / f"predictions_k{k}.npy"))
        with torch.no_grad():
            ours = model(**batch).logits  # padding is masked: each phrase's logits as the engine's batches gave
        torch.testing.assert_close(ours, engine, atol=1e-4, rtol=1e-4)
    # Trainer's checkpoint went through the same save_pretrained: the same weights, at the training k.
    checkpoint = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_ep2 / f"checkpoint-{MINILM_STEPS}"
    )
    assert active_experts(checkpoint) == k_at_step(
        KScheduleConfig(k_min=N // 2, k_max=N, end_step=MINILM_STEPS), MINILM_STEPS - 1
    )
    saved, checkpointed = model.state_dict(), checkpoint.state_dict()
    assert saved.keys() == checkpointed.keys() and all(torch.equal(saved[n], checkpointed[n]) for n in saved)


def test_the_trainer_trained_rescale_model_densifies_to_the_engines_logits_at_k_n(minilm_ep2, tmp_path):
    """``smoe-hf-convert --densify`` on what Trainer saved (rescale weighting): a plain BERT classifier
    that transformers alone loads and that computes the engine's k = N logits."""
    dense_dir = tmp_path / "dense"
    assert hf_convert_main([str(minilm_ep2 / "model"), str(dense_dir), "--densify"]) == 0
    torch.save(minilm_dev_batch(dense_dir), tmp_path / "inputs.pt")
    job = {"dir": str(dense_dir), "auto_class": "AutoModelForSequenceClassification"}
    run_plain_transformers([{**job, "inputs": str(tmp_path / "inputs.pt"), "out": str(tmp_path / "out.pt")}], tmp_path)
    engine = torch.from_numpy(np.load(minilm_ep2 / f"predictions_k{N}.npy"))
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), engine, atol=1e-4, rtol=1e-4)


LM_STEPS, LM_SAVE_AT = 6, 4
LM_ARGS = ["--task", "causal_lm", "--deepspeed", str(REPO / "ds_configs" / "hf_trainer" / "zero3.json")]
LM_ARGS += ["--max_steps", str(LM_STEPS), "--save_steps", str(LM_SAVE_AT)]


@pytest.fixture(scope="module")
def gpt2_zero3(tmp_path_factory) -> Path:
    """The tiny GPT-2's continued pretraining at ZeRO-3 (ep_size 1) under the deepspeed launcher (the
    other runs use torchrun): 6 steps, k 4 -> 7, checkpoints at steps 4 and 6 (both kept), predicted at
    every k, saved."""
    out = tmp_path_factory.mktemp("hf_trainer") / "gpt2_zero3"
    lm_args = [*LM_ARGS, "--keep_checkpoints", "2", "--predictions", "--eval_ks", *map(str, EVERY_K)]
    example(out, *lm_args, probe=True, launcher="deepspeed")
    return out


def test_zero3_trains_the_tiny_gpt2_and_its_export_gives_the_engines_logits_at_every_k(gpt2_zero3):
    history = log_history(gpt2_zero3)
    losses = train_losses(history)
    assert losses[LM_STEPS] < losses[1] - 0.2, losses  # 5.46 -> 5.13 measured
    assert_k_follows_the_schedule(history, LM_STEPS)
    shards = {p.name for p in (gpt2_zero3 / f"checkpoint-{LM_STEPS}").glob("global_step*/*.pt")}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= shards
    # trainer.save_model: rank 0's save_pretrained gets the weights ZeRO-3 gathered
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_zero3 / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gpt2_zero3 / "model")
    _, validation = example_module().causal_lm_data(argparse.Namespace(train=None, max_length=64), tokenizer)
    ids = torch.tensor(validation["input_ids"])
    for k in EVERY_K:
        set_active_experts(model, k)
        with torch.no_grad():
            ours = model(input_ids=ids).logits
        torch.testing.assert_close(ours, torch.from_numpy(np.load(gpt2_zero3 / f"predictions_k{k}.npy")))
    checkpoint = transformers.AutoModelForCausalLM.from_pretrained(gpt2_zero3 / f"checkpoint-{LM_STEPS}")
    saved, checkpointed = model.state_dict(), checkpoint.state_dict()
    assert all(torch.equal(saved[n], checkpointed[n]) for n in saved)  # the same save, at the last step


def test_zero3_resume_after_a_kill_gives_the_uninterrupted_losses(gpt2_zero3, tmp_path):
    """Rank 1 is killed at the start of step 6, after the step-4 checkpoint and step 5; Trainer's
    ``resume_from_checkpoint`` then runs steps 5 and 6 again and logs the uninterrupted run's losses."""
    out = tmp_path / "run"
    kill = {faults.ENV: f"kill:1:train:{LM_SAVE_AT + 1}"}
    killed = example(out, *LM_ARGS, "--eval_ks", str(N), env=kill, check=False)
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert (out / f"checkpoint-{LM_SAVE_AT}").is_dir() and not (out / f"checkpoint-{LM_STEPS}").exists()
    example(out, *LM_ARGS, "--resume", "--eval_ks", str(N))
    resumed, whole = train_losses(log_history(out)), train_losses(log_history(gpt2_zero3))
    assert sorted(resumed) == list(range(1, LM_STEPS + 1))
    for step in range(LM_SAVE_AT + 1, LM_STEPS + 1):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-5), (step, resumed, whole)
