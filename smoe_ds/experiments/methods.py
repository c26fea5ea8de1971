"""The configurations the paper experiment compares, at three scales.

Every method shares the scale's data, seed, steps, optimizer, batch and parameter count (the
dense baseline's FFN is N x d_expert wide, the same as all experts together); only ``moe``
differs. Overrides are plain dicts merged into the scale's base config, and the result is an
ordinary smoe-ds config file, so any run can be repeated with ``smoe_ds.train`` alone.
"""

from __future__ import annotations

import copy

_OPTIMIZER = {"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True}}

# steps, model, experts, batch, learning rate and evaluation per scale
SCALES: dict[str, dict] = {
    # under 5 minutes for every method on 2 CPU cores: the test of the pipeline, not of the claims
    "tiny": {
        "steps": 40,
        "lr": 3e-3,
        "micro_batch": 8,
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "block_size": 64},
        "moe": {"num_experts": 4, "d_expert": 32, "ep_size": 2},
        "run": {"log_interval": 10, "eval_interval": 20, "eval_batches": 2, "final_eval_batches": 4},
        "precision": None,
    },
    # the real CPU experiment: byte-level, 4 layers, d_model 192, 16 experts (1-2 hours here)
    "small": {
        "steps": 3000,
        "lr": 2e-3,
        "micro_batch": 16,
        "model": {"d_model": 192, "n_layers": 4, "n_heads": 4, "block_size": 128},
        "moe": {"num_experts": 16, "d_expert": 48, "ep_size": 2},
        "run": {"log_interval": 50, "eval_interval": 500, "eval_batches": 8, "final_eval_batches": 32},
        "precision": None,
    },
    # the paper's enwik8 Transformer-XL size (12 layers, d_model 512, 16 experts), for GPUs in bf16
    "paper": {
        "steps": 400_000,
        "lr": 2.5e-4,
        "micro_batch": 22,
        "model": {"d_model": 512, "n_layers": 12, "n_heads": 8, "block_size": 512},
        "moe": {"num_experts": 16, "d_expert": 128, "ep_size": 8},
        "run": {"log_interval": 200, "eval_interval": 4000, "eval_batches": 50, "final_eval_batches": 200},
        "precision": "bf16",
    },
}


def methods(num_experts: int, steps: int) -> dict[str, dict]:
    """Method name -> its ``moe`` overrides. SMoE-Dropout's schedules reach k = N at 3/4 of the
    steps, so the last quarter trains at full capacity; the fixed-k methods use k = 2."""
    ramp = {"k_min": 1, "k_max": num_experts, "start_step": 0, "end_step": (3 * steps) // 4}
    smoe = {
        f"smoe_dropout_{kind}": {"mode": "smoe_dropout", "k_schedule": {**ramp, "kind": kind}}
        for kind in ("linear", "cosine", "exponential")
    }
    return {
        "dense": {"mode": "dense"},
        "learned": {"mode": "learned", "k": 2},
        "thor": {"mode": "thor"},
        "random_fixed": {"mode": "random_fixed", "k": 2},
        **smoe,
    }


def power_of_two_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def build_config(scale: str, method: str, data_path: str | None, out_dir: str, seed: int = 0) -> dict:
    """The full smoe-ds config (DeepSpeed keys plus model/moe/data/run) of one method at one scale."""
    s = SCALES[scale]
    n = s["moe"]["num_experts"]
    moe = {**copy.deepcopy(s["moe"]), **methods(n, s["steps"])[method]}
    optimizer = copy.deepcopy(_OPTIMIZER)
    optimizer["params"]["lr"] = s["lr"]
    cfg = {
        "train_micro_batch_size_per_gpu": s["micro_batch"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": optimizer,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": "auto", "warmup_num_steps": max(5, s["steps"] // 50)},
        },
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
        "csv_monitor": {"enabled": True},
        "model": copy.deepcopy(s["model"]),
        "moe": moe,
        "data": {"path": data_path, "seed": seed},
        "run": {
            **s["run"],
            "max_steps": s["steps"],
            "seed": seed,
            "out_dir": out_dir,
            "save_interval": max(1, s["steps"] // 4),
            # every method at every k it can run: dense has one width, the others any k
            "eval_ks": [n] if method == "dense" else power_of_two_ks(n),
        },
    }
    if s["precision"]:
        cfg[s["precision"]] = {"enabled": True}
    return cfg
