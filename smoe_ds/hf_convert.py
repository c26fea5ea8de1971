"""Convert a pretrained dense Hugging Face model to SMoE-Dropout, or densify one back.

    python -m smoe_ds.hf_convert SRC OUT --experts N [--weighting rescale|softmax] [--router-seed S]
    python -m smoe_ds.hf_convert SMOE_DIR OUT --densify

SRC is a local model directory or a hub name; OUT becomes an SMoE directory (after
``import smoe_ds``, ``AutoModel.from_pretrained`` or ``load_smoe`` reloads it at any k).
``--densify`` writes a ``rescale`` SMoE directory as a plain model of the original
architecture, loadable by ``transformers`` alone. The tokenizer travels along when SRC has
one. Bad input stops with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smoe_ds.config.schema import ConfigError


def _load_dense(src: str):
    """SRC's model in the class its config names (e.g. GPT2LMHeadModel), so heads are kept."""
    import transformers

    from smoe_ds.hf.surgery import dense_config

    config = dense_config(src)
    archs = [a for a in config.architectures or [] if hasattr(transformers, a)]
    model_cls = getattr(transformers, archs[0]) if archs else transformers.AutoModel
    return model_cls.from_pretrained(src).eval()


def copy_tokenizer(src: str | Path, out: Path) -> bool:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError, TypeError):  # no tokenizer files: a model-only directory
        return False
    tokenizer.save_pretrained(out)
    return True


def _params(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return f"{total:,} parameters ({frozen:,} of them frozen router weights)"


def convert_cmd(src: str, out: Path, experts: int, weighting: str, router_seed: int) -> None:
    from smoe_ds.hf.conversion import convert_model
    from smoe_ds.hf.save import save_smoe

    model = _load_dense(src)
    dense_params = sum(p.numel() for p in model.parameters())
    spec = convert_model(model, experts, weighting, router_seed).smoe_dropout
    save_smoe(model, out)
    tok = copy_tokenizer(src, out)
    print(f"converted {src} ({type(model).__name__}, family {spec.family}): {spec.num_layers} FFN layers")
    print(f"  N = {spec.num_experts} experts each, weighting {spec.weighting}, router seed {spec.router_seed}")
    print(f"  {_params(model)}; the dense model had {dense_params:,}")
    print(f"wrote {out}{' (with tokenizer)' if tok else ''}")


def densify_cmd(src: str, out: Path) -> None:
    from smoe_ds.hf.auto import load_smoe
    from smoe_ds.hf.save import export_dense

    model = load_smoe(src)
    export_dense(model, out)
    tok = copy_tokenizer(src, out)
    spec = model.smoe_dropout
    print(
        f"densified {src} ({spec.family}, N = {spec.num_experts}, {spec.num_layers} layers) into a plain "
        f"{type(model).__name__}: {out}{' (with tokenizer)' if tok else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoe-hf-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="dense model directory or hub name; with --densify, an SMoE directory")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--experts", type=int, help="N: experts per FFN (must divide its hidden size)")
    p.add_argument("--weighting", choices=("rescale", "softmax"), default="rescale")
    p.add_argument("--router-seed", type=int, default=1234)
    p.add_argument("--densify", action="store_true", help="write SRC (an SMoE directory) as a plain dense model")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the summary says what was loaded and written; errors stay one line
    try:
        if args.densify and args.experts is not None:
            raise ConfigError("--densify writes an SMoE directory as it is; --experts is for conversion only")
        if args.densify:
            densify_cmd(args.src, args.out)
        elif args.experts is None:
            raise ConfigError("--experts N is required (or --densify)")
        else:
            convert_cmd(args.src, args.out, args.experts, args.weighting, args.router_seed)
    except ConfigError as e:
        print(f"smoe-ds: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
