"""Bad input costs a second: one line naming the problem, exit code 2, nothing written.

Most cases call the trainer's own ``main`` (what ``python -m smoe_ds.train`` runs) in this process,
on tests/configs/e2e_tiny.json (a world of one, ep_size 1 unless the case says otherwise): the same
argument parsing, config loading and checks before any engine is built, the same one line on
stderr and exit code, without starting a trainer process for each. Three cases run the real command
line: ``python -m smoe_ds.train`` in a process of its own, and 2 ranks under the deepspeed launcher
and under torchrun. The config's own refusals are checked on ``load_config`` in
tests/config/test_config.py.
"""

import contextlib
import io
import json
import os
import subprocess

import pytest

from smoe_ds import train as trainer
from tests.helpers.launch import REPO, ensure_ops_built, run_ranks
from tests.helpers.malicious import RunsCode

CONFIG = str(REPO / "tests" / "configs" / "e2e_tiny.json")
ERROR = "smoe-ds: error:"


def sets(*items: str) -> list[str]:
    return sum([["--set", s] for s in items], [])


def train(*args: str, launcher: str = "python", nprocs: int = 1):
    """``python -m smoe_ds.train`` with ``args``, under ``launcher``, in processes of its own."""
    return run_ranks(launcher, nprocs, ["smoe_ds.train", *args], module=True, check=False, timeout=300)


def train_in_process(*args: str) -> subprocess.CompletedProcess:
    """The trainer's ``main(args)`` in this process, with its exit code, stdout and stderr as a run
    of the command would give them. It joins a process group of one (as the command does without a
    launcher) and leaves it; the environment variables that sets are put back afterwards."""
    ensure_ops_built()  # starting the process group loads DeepSpeed's shm op (tests/conftest.py)
    saved = os.environ.copy()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = trainer.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["smoe_ds.train", *args], code, out.getvalue(), err.getvalue())


def assert_refused(proc, message: str) -> None:
    """Exit code 2, exactly one error line and it holds ``message``, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith(ERROR)]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], (message, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout


def refuse(out, message: str, *args: str, config: str = CONFIG) -> None:
    """The trainer (in this process) with ``args`` and out_dir ``out``: refused with ``message``, and
    ``out`` never created."""
    assert_refused(train_in_process("--config", config, *sets(f"run.out_dir={out}", "moe.ep_size=1"), *args), message)
    assert not out.exists()


# -- the command line: exit code 2 and one line from a process of its own ---------------------------


def test_bad_config_on_the_command_line_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = train("--config", CONFIG, *sets(f"run.out_dir={out}", "moe.ep_size=1", "moe.expert_count=4"))
    assert_refused(proc, "unknown config key moe.expert_count (known keys in moe:")
    assert not out.exists()


# -- the config: what load_config accepts but the run cannot do -------------------------------------

CASES = {  # --set overrides -> the message
    "batch_sizes_do_not_multiply": (
        ["train_batch_size=12"],
        "train_batch_size (12) != train_micro_batch_size_per_gpu (8) * gradient_accumulation_steps (1) "
        "* world size (1)",
    ),
    "fp16_on_cpu": (["fp16.enabled=true"], "fp16.enabled is true, but DeepSpeed's cpu accelerator has no fp16"),
    "missing_data": (["data.path=/no/such/corpus.txt"], "data.path not found: /no/such/corpus.txt"),
    "tokenizer_folder_that_is_not_one": (
        [f"data.tokenizer={REPO / 'tests' / 'configs'}"],
        f"data.tokenizer {REPO / 'tests' / 'configs'} is not a Hugging Face tokenizer folder",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config(tmp_path, case):
    overrides, message = CASES[case]
    refuse(tmp_path / "run", message, *sets(*overrides))


CONFIG_FILES = {  # the config file's text (None: no file) -> the message
    "missing": (None, "config file not found: {path}"),
    "json_syntax": ('{\n "optimizer": {\n}\n "model": 1}', "{path}: invalid JSON at line 4, column 2"),
    "json_list": ("[1, 2]", "{path}: the top level must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_bad_config_file(tmp_path, case):
    text, message = CONFIG_FILES[case]
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    refuse(tmp_path / "run", message.format(path=path), config=str(path))


# -- the data --------------------------------------------------------------------------------------


def paragraphs(n: int, size: int) -> bytes:
    """``n`` paragraphs of ``size`` bytes each."""
    return b"".join(b"%04d " % i + b"x" * (size - 5) + b"\n\n" for i in range(n))


# 40 paragraphs of 198 bytes (+ 2 newlines): a 5% validation split holds 2 of them, 6 blocks of 65 tokens
# (fewer than one micro-batch of 8); with 25% held out, the training split holds 30, fewer than 160 blocks.
DATA = {  # file name, its bytes, --set overrides -> the message ({path}: the file)
    "empty_file": ("corpus.txt", b"", [], "data.path {path} is empty"),
    "shorter_than_one_block": (
        "corpus.txt",
        b"one paragraph\n\nanother paragraph\n",
        ["data.val_fraction=0.5"],
        "the training split of {path} is shorter than one block of 65 tokens (model.block_size + 1)",
    ),
    "too_few_blocks_for_validation": (
        "corpus.txt",
        paragraphs(40, 198),
        [],
        "the validation split has 6 blocks, too few for 1 ranks x micro-batch 8; raise data.val_fraction",
    ),
    "too_few_blocks_for_one_step": (
        "corpus.txt",
        paragraphs(40, 198),
        ["gradient_accumulation_steps=20", "data.val_fraction=0.25"],
        "too few for one step of 160 (1 ranks x micro-batch 8 x 20 accumulation steps)",
    ),
    "not_utf8": (
        "corpus.txt",
        b"plain text first\n\nthen caf\xe9 in latin-1\n",
        [],
        "{path} is not UTF-8: byte 0xe9 at offset 26",
    ),
    "missing_column": (
        "corpus.jsonl",
        b"".join(json.dumps({"body": "x" * 300, "id": i}).encode() + b"\n" for i in range(10)),
        [],
        "data.path {path} has no column 'text' (its columns: body, id); set data.text_column",
    ),
}


@pytest.mark.parametrize("case", sorted(DATA))
def test_bad_data(tmp_path, case):
    name, content, overrides, message = DATA[case]
    path = tmp_path / name
    path.write_bytes(content)
    refuse(tmp_path / "run", message.format(path=path), *sets(f"data.path={path}", *overrides))


# -- the run folder --------------------------------------------------------------------------------


def tree(folder) -> dict:
    """Every path under ``folder`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_out_dir_that_cannot_be_created(tmp_path):
    # Tests run as root, and root writes into any folder whatever its mode bits (os.access says yes
    # even for /proc, where mkdir then fails). What stops root too is a parent that is a regular file.
    parent = tmp_path / "a_file"
    parent.write_text("not a folder\n")
    refuse(parent / "run", f"run.out_dir {parent / 'run'} cannot be created: {parent} is a file, not a folder")
    assert parent.read_text() == "not a folder\n"


SHORT_RUN = ("moe.ep_size=1", "run.max_steps=2", "run.eval_interval=0")


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A finished 2-step run (a process of its own) with its checkpoint in run/checkpoints/step2."""
    out = tmp_path_factory.mktemp("two_steps") / "run"
    proc = train(
        "--config", CONFIG, *sets(f"run.out_dir={out}", *SHORT_RUN, "run.final_eval_batches=1", "run.eval_ks=[4]")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step2" / "smoe_ds_meta.json").is_file()
    return out


def copy_run(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "run")


def resume(out, *args: str):
    """Train on from the run in ``out`` (one more step), with ``args``, in this process."""
    return train_in_process("--config", CONFIG, *sets(f"run.out_dir={out}", *SHORT_RUN, "run.max_steps=3"), *args)


def test_resume_folder_of_a_different_model(two_step_run, tmp_path):
    out = copy_run(two_step_run, tmp_path)
    before = tree(out)
    proc = resume(out, *sets("model.d_model=32", "moe.d_expert=16"))
    assert_refused(
        proc,
        f"{out / 'checkpoints' / 'step2'} was written by a different model (model.d_model: 64 in the checkpoint "
        "vs 32 now, moe.d_expert: 32 in the checkpoint vs 16 now); use another run.out_dir, or set "
        "run.resume=false to start over there",
    )
    assert tree(out) == before


def test_resume_refuses_a_checkpoint_carrying_code_before_deepspeed_reads_it(two_step_run, tmp_path):
    import torch

    out = copy_run(two_step_run, tmp_path)
    rng = out / "checkpoints" / "step2" / "rng_state_rank0.pt"
    marker = tmp_path / "the_code_ran"
    torch.save({"torch": torch.get_rng_state(), "payload": RunsCode(marker)}, rng)
    before = tree(out)
    proc = resume(out)
    assert_refused(proc, f"refusing {rng}: it holds posix.system, which is not a type smoe-ds or DeepSpeed writes")
    assert not marker.exists() and tree(out) == before


def test_resume_with_a_malformed_meta_config_gives_one_line(two_step_run, tmp_path):
    out = copy_run(two_step_run, tmp_path)
    meta_path = out / "checkpoints" / "step2" / "smoe_ds_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["moe"]["num_experts"] = "four"
    meta_path.write_text(json.dumps(meta))
    proc = resume(out)
    assert_refused(proc, f"{meta_path} holds no usable config (moe.num_experts must be int, got str 'four')")


# -- under launchers: every rank checks, one line is printed -----------------------------------------


def test_bad_config_under_the_deepspeed_launcher_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    args = sets(f"run.out_dir={out}", "moe.ep_size=4", "moe.num_experts=8", "moe.k_schedule.k_max=8")
    proc = train("--config", CONFIG, *args, launcher="deepspeed", nprocs=2)
    assert proc.returncode != 0
    combined = proc.stdout + proc.stderr
    assert combined.count("smoe-ds: error: the world size (2) is not divisible by moe.ep_size (4)") == 1
    assert combined.count(ERROR) == 1
    assert not out.exists()


def test_bad_data_under_torchrun_every_rank_stops_one_line(tmp_path):
    # Local rank 0 loads the data first while rank 1 waits in a barrier; a data error on rank 0
    # releases rank 1, which then fails the same way, silently (torchrun may stop it first).
    out, corpus = tmp_path / "run", tmp_path / "corpus.txt"
    corpus.write_bytes(b"plain text first\n\nthen caf\xe9 in latin-1\n")
    proc = train("--config", CONFIG, *sets(f"run.out_dir={out}", f"data.path={corpus}"), launcher="torchrun", nprocs=2)
    assert proc.returncode != 0
    combined = proc.stdout + proc.stderr
    assert combined.count(f"{ERROR} {corpus} is not UTF-8: byte 0xe9 at offset 26") == 1
    assert combined.count(ERROR) == 1
    assert not out.exists()
