"""Run by path in a fresh interpreter: load densified models with transformers alone.

    python plain_load.py jobs.json

Each job names a model directory, an Auto class, an inputs file and an output file; the final
tensor (logits, else last hidden states) is saved. Proves the export needs no smoe_ds. A job
with ``"expect_error": true`` must fail to load instead; its error message is saved as text.
"""

import json
import sys

import torch
import transformers

for job in json.load(open(sys.argv[1])):
    auto_class = getattr(transformers, job["auto_class"])
    if job.get("expect_error"):
        try:
            auto_class.from_pretrained(job["dir"])
        except Exception as e:  # what a user without smoe_ds sees
            open(job["out"], "w").write(f"{type(e).__name__}: {e}")
            print(job["dir"], "refused")
            continue
        raise SystemExit(f"{job['dir']} loaded without smoe_ds")
    model = auto_class.from_pretrained(job["dir"]).eval()
    with torch.no_grad():
        out = model(**torch.load(job["inputs"]))
    torch.save(out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state, job["out"])
    print(job["dir"], type(model).__name__)
assert "smoe_ds" not in sys.modules, "the plain load imported smoe_ds"
print("smoe_ds imported:", "smoe_ds" in sys.modules)
