"""SMoE-Dropout on pretrained dense Hugging Face transformers (BERT/RoBERTa, GPT-2, LLaMA/Mistral).

- ``conversion``: ``convert_model``, the FFNs split (``surgery``) and ``save_pretrained`` bound (``save``).
- ``surgery``: split each FFN into N experts behind a frozen random router, in place.
- ``ffn``: the converted FFN module (shared experts and layer from ``smoe_ds.moe``).
- ``families``: where each architecture keeps its FFN and in which layout.
- ``save``: a converted model's ``save_pretrained`` (the SMoE directory), ``save_smoe``;
  densify a ``rescale`` model back into the original architecture (``export_dense``).
- ``smoe_config``, ``auto``: the saved SMoE directory's config, and its loader for transformers' Auto
  classes (``load_smoe``).
- ``gather``: the whole model on rank 0 from an expert-parallel engine (the fine-tuner's export).
- ``tasks``: the fine-tuning tasks (head, batches, metric); ``labelled_data``: their labelled files.
- ``trainer_callback``: ``SMoEDropoutCallback``, SMoE-Dropout inside a Hugging Face ``Trainer`` script.
- ``trainer_deepspeed``: the model and optimizer readied for Trainer's DeepSpeed integration (ZeRO
  stages, expert parallelism): ``convert_for_trainer``, ``optimizer_cls_and_kwargs``.

The CLI is ``python -m smoe_ds.hf_convert``.
"""

from smoe_ds.hf.auto import load_smoe
from smoe_ds.hf.conversion import convert_model
from smoe_ds.hf.save import export_dense, save_smoe
from smoe_ds.hf.surgery import SMoESpec
from smoe_ds.hf.trainer_callback import SMoEDropoutCallback
from smoe_ds.hf.trainer_deepspeed import convert_for_trainer, optimizer_cls_and_kwargs
from smoe_ds.moe.layer import set_active_experts

__all__ = [
    "SMoEDropoutCallback",
    "SMoESpec",
    "convert_for_trainer",
    "convert_model",
    "export_dense",
    "load_smoe",
    "optimizer_cls_and_kwargs",
    "save_smoe",
    "set_active_experts",
]
