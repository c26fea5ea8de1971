"""Every command the README (and CONTRIBUTING.md, docs/) shows parses with the real argument parser of what it runs.

A command in a ```bash block is taken apart as the shell would (continuation lines joined, comments
dropped, ``for VAR in ...; do ... done`` expanded, ``VAR=$(...)`` run for real to get the value):

- ``deepspeed ...`` goes through the deepspeed launcher's own parser (``deepspeed.launcher.runner``),
  then the module or script it starts through that module's parser;
- ``torchrun ...`` goes through torchrun's own parser, then the module or script it starts as above;
  a script (``deepspeed ... launch/SCRIPT.py``, ``torchrun ... launch/SCRIPT.py``) must be one of
  ``launch/`` and is parsed by its own ``main``;
- ``python -m MODULE ...`` and the installed commands (``smoe-train``, ...; setup.cfg's entry points)
  go through the module's parser;
- a ``--config FILE --set ...`` command also loads and validates its config, as the run would first;
- ``make`` targets are the CI's own (``make test``) or too long for a test (``make train``, minutes);
- ``bash SCRIPT ...`` (an experiment's recorded run script): the script must exist and pass ``bash -n``,
  and each command in it that runs smoe-ds is checked as above;
- a launcher of ``launch/`` (``sbatch launch/slurm.sbatch CONFIG``, ``VAR=... launch/torchrun.sh CONFIG``):
  the script must exist and pass ``bash -n``, and the trainer it starts is checked with the
  ``.json`` config and the arguments after it, as above.

Every relative link of the README, CONTRIBUTING.md and docs/*.md names a file that exists.

Parsing stops right after ``parse_args``: nothing trains, nothing is written.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launch import REPO

DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def logical_lines(block: str) -> list[list[str]]:
    """The block's commands as argv lists, with ``for`` loops expanded once per value."""
    lines = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    lines = [words for words in lines if words]
    out, i = [], 0
    while i < len(lines):
        words = lines[i]
        if words[0] == "for":  # for VAR in A B ...; do  (shlex keeps "B;" and "do" as words)
            var, values = words[1], [w.rstrip(";") for w in words[3:] if w != "do"]
            end = next(j for j in range(i + 1, len(lines)) if lines[j] == ["done"])
            for value in values:
                out += [[w.replace(f"${var}", value) for w in body] for body in lines[i + 1 : end]]
            i = end + 1
            continue
        out.append(words)
        i += 1
    return out


def commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for block in bash_blocks(path):
            found += [(f"{path.relative_to(REPO)}: {' '.join(words)}", words) for words in logical_lines(block)]
    return found


def entry_points() -> dict[str, str]:
    """Installed command -> its module, from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.split("=") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    return {name.strip(): target.strip().split(":")[0] for name, target in lines}


class Parsed(Exception):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = args


@contextlib.contextmanager
def stop_after_parsing():
    """Make the next ``ArgumentParser.parse_args`` raise ``Parsed`` with its result, so a CLI's
    ``main`` parses its real arguments with its real parser and then stops."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def script_main(path: str):
    """The ``main`` of a script of ``launch/`` (``launch/hf_trainer_example.py``), imported from its file."""
    script = REPO / path
    assert script.is_file() and script.parent == REPO / "launch", f"{path}: not a script of launch/"
    spec = importlib.util.spec_from_file_location(f"launch_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def parse_module(module: str, argv: list[str]) -> argparse.Namespace:
    main = script_main(module) if module.endswith(".py") else importlib.import_module(module).main
    with stop_after_parsing():
        try:
            main(argv)
        except Parsed as done:
            return done.namespace
        except SystemExit as e:
            raise AssertionError(f"python -m {module} refused its arguments (exit {e.code}): {argv}") from None
    raise AssertionError(f"python -m {module} {argv} ran without parsing any arguments")


def check_config(module: str, args: argparse.Namespace) -> None:
    """A ``--config``/``--set`` command: load and validate the config it names, as the run does first."""
    # The transfer experiment's --config is the base that each of its runs completes (model, data).
    if not getattr(args, "config", None) or module == "smoe_ds.experiments.transfer":
        return
    if str(args.config).startswith("runs/") and not (REPO / args.config).exists():  # written by the command before
        return
    from smoe_ds.config.schema import TrainConfig, load_config
    from smoe_ds.finetuning.config import FinetuneConfig

    cls = FinetuneConfig if module == "smoe_ds.finetune" else TrainConfig
    load_config(args.config, args.set, cls=cls).resolve()


def run_assignment(words: list[str], env: dict[str, str]) -> bool:
    """``VAR=$(command)``: run the command for real (it must succeed) and remember VAR."""
    m = re.fullmatch(r"(\w+)=\$\((.*)\)", " ".join(words))
    if not m:
        return False
    inner = [w.replace(".venv/bin/python", sys.executable) for w in shlex.split(m[2])]
    proc = subprocess.run(inner, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env[m[1]] = proc.stdout.strip()
    return True


def runs_smoe_ds(words: list[str]) -> bool:
    head = Path(words[0]).name
    return head == "deepspeed" or head.startswith("python") or head in entry_points()


def check_script(words: list[str], env: dict[str, str]) -> None:
    """``bash SCRIPT ARGS``: the script parses, and its smoe-ds commands parse. Its own variables
    stay as written (``$data``), which is all an argument parser sees of a path."""
    script = REPO / words[1]
    assert script.is_file(), f"{words}: {words[1]} does not exist"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{words[1]} does not parse: {proc.stderr}"
    inner = [line for line in logical_lines(script.read_text(encoding="utf-8")) if runs_smoe_ds(line)]
    assert inner, f"{words[1]} runs no smoe-ds command"
    for line in inner:
        check_command(line, env)


def check_launcher(script: str, args: list[str], env: dict[str, str]) -> None:
    """A ``launch/`` script: it parses, and the trainer it starts takes the config and what follows it."""
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{script} does not parse: {proc.stderr}"
    text = path.read_text(encoding="utf-8")
    assert "smoe_ds.train" in text or "smoe-train" in text, f"{script} does not start smoe_ds.train"
    config = next((i for i, a in enumerate(args) if a.endswith(".json")), None)
    assert config is not None, f"{script} {args}: no .json config"
    # the trainer's own options follow the config; a word before them is the script's (autotune.sh's mode)
    options = next((i for i in range(config + 1, len(args)) if args[i].startswith("--")), len(args))
    check_command(["python", "-m", "smoe_ds.train", "--config", args[config], *args[options:]], env)


def check_command(words: list[str], env: dict[str, str]) -> None:
    words = [re.sub(r"\$(\w+)", lambda m: env.get(m[1], m[0]), w) for w in words]
    while len(words) > 1 and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value before a command
        words = words[1:]
    head = Path(words[0]).name
    if head == "make":
        return
    if head == "sbatch":
        check_launcher(words[1], words[2:], env)
        return
    if words[0].startswith("launch/"):
        check_launcher(words[0], words[1:], env)
        return
    if head == "bash" and len(words) > 1 and words[1].startswith("launch/"):
        check_launcher(words[1], words[2:], env)
        return
    if head == "bash":
        check_script(words, env)
        return
    if head == "deepspeed":
        from deepspeed.launcher.runner import parse_args as launcher_args

        try:
            launcher = launcher_args(words[1:])
        except SystemExit as e:
            raise AssertionError(f"the deepspeed launcher refused {words} (exit {e.code})") from None
        assert launcher.module or launcher.user_script.endswith(".py"), f"{words}: run a smoe_ds module with --module"
        module, argv = launcher.user_script, launcher.user_args
    elif head == "torchrun":
        from torch.distributed.run import get_args_parser

        launcher = get_args_parser().parse_args(words[1:])
        module, argv = launcher.training_script, launcher.training_script_args
    elif head.startswith("python"):
        assert words[1] == "-m", words
        module, argv = words[2], words[3:]
    else:
        assert head in entry_points(), f"{words}: {head} is neither smoe-ds's nor a command this test knows"
        module, argv = entry_points()[head], words[1:]
    check_config(module, parse_module(module, argv))


def test_the_docs_show_commands():
    heads = {Path(words[0]).name for _, words in commands()}
    assert {"make", "deepspeed", "python", "smoe-hf-convert"} <= heads, heads


@pytest.mark.parametrize("doc", [str(p.relative_to(REPO)) for p in DOCS if bash_blocks(p)])
def test_every_command_in_the_docs_parses(doc):
    env: dict[str, str] = {}
    for label, words in commands():
        if label.startswith(f"{doc}: "):
            if not run_assignment(words, env):
                check_command(words, env)


def test_a_stale_command_is_caught():
    """The checker itself: the launcher's ``-m`` (it wants ``--module``) and an unknown flag fail."""
    with pytest.raises(AssertionError, match="the deepspeed launcher refused"):
        check_command(["deepspeed", "--num_gpus", "2", "-m", "smoe_ds.train", "--config", "x.json"], {})
    with pytest.raises(AssertionError, match="refused its arguments"):
        check_command(["python", "-m", "smoe_ds.convert", "ckpt", "out", "--no-such-flag"], {})
    with pytest.raises(AssertionError, match="does not exist"):
        check_command(["bash", "docs/no_such_script.sh"], {})
    with pytest.raises(AssertionError, match="does not exist"):
        check_command(["sbatch", "launch/no_such.sbatch", "ds_configs/cpu_tiny.json"], {})


def test_every_relative_link_in_the_docs_names_a_file():
    """``[text](path)`` in the README, CONTRIBUTING.md and docs/*.md (not docs/results/, dated records)."""
    pages = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.partition("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
    assert not missing, missing
