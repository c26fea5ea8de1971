"""The library of ``smoe_ds.finetune``: its config, the tasks (classification, causal LM, math word
problems), labelled data, and starting from a smoe-ds export."""
