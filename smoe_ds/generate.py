"""Generate text from an exported model at any k.

python -m smoe_ds.generate runs/cpu_tiny/export --k 4 --prompt "def main(" --max-new-tokens 200
"""

from __future__ import annotations

import argparse
import sys

import torch

from smoe_ds.data import ByteTokenizer
from smoe_ds.inference import load_model, load_tokenizer


def generate(
    model_dir: str,
    prompt: str,
    k: int | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    device: str,
) -> str:
    model = load_model(model_dir, device, k)
    tok = load_tokenizer(model_dir)
    if isinstance(tok, ByteTokenizer):
        ids = torch.tensor([list(prompt.encode("utf-8")) or [10]], device=device)
    else:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_k=top_k if sampling else None,
        pad_token_id=0,
    )
    return tok.decode(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    from smoe_ds.cli import run_main

    p = argparse.ArgumentParser(prog="smoe-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a directory written by smoe_ds.convert")
    p.add_argument("--prompt", default="")
    p.add_argument("--k", type=int, default=None, help="active experts (default: as exported, N)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    return run_main(
        lambda: print(
            generate(
                args.model_dir,
                args.prompt,
                args.k,
                args.max_new_tokens,
                args.temperature,
                args.top_k,
                args.seed,
                args.device,
            )
        )
    )


if __name__ == "__main__":
    sys.exit(main())
