"""TORCH_CUDA_ARCH_LIST as DeepSpeed's CUDA op builder can parse it (smoe_ds.ops.prebuild).

On the H200 of ``make gpu-check`` the image names Hopper's variant target (9.0a) and DeepSpeed
0.19.8 failed to build FusedAdam with ``invalid literal for int() with base 10: '0a'``. The
builder's arch parsing is plain Python, so DeepSpeed's real CUDA builder is exercised here on
the CPU: it fails on the variant and accepts the rewritten list. Once a DeepSpeed release parses the
variant itself, that test skips, saying so, instead of failing.
"""

import os

import deepspeed
import pytest
from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

from smoe_ds.ops.prebuild import deepspeed_arch_list, fix_cuda_arch_list_for_deepspeed


@pytest.mark.parametrize(
    "given, expected",
    [
        ("9.0a", "9.0"),
        ("8.0;9.0a", "8.0;9.0"),
        ("8.0 9.0 9.0a 10.0f+PTX", "8.0;9.0;10.0+PTX"),
        ("7.5;8.6+PTX", "7.5;8.6+PTX"),
    ],
)
def test_variant_targets_become_plain_ones_in_order_without_duplicates(given, expected):
    assert deepspeed_arch_list(given) == expected


def jit_arch_args() -> list[str]:
    builder = FusedAdamBuilder()
    builder.jit_mode = True  # as when the engine builds it at start-up
    return builder.compute_capability_args()


def test_deepspeeds_builder_fails_on_the_variant_and_accepts_the_fixed_list(monkeypatch, capsys):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    try:
        jit_arch_args()
    except ValueError as e:
        assert "invalid literal" in str(e)  # the bug the workaround is for: go on and test the workaround
    else:
        pytest.skip(
            f"DeepSpeed {deepspeed.__version__} now parses the variant target 9.0a itself: the workaround "
            "(smoe_ds.ops.prebuild.fix_cuda_arch_list_for_deepspeed) is no longer needed for it"
        )
    fix_cuda_arch_list_for_deepspeed()
    assert "'8.0;9.0a' -> '8.0;9.0'" in capsys.readouterr().err
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    assert isinstance(jit_arch_args(), list)


def test_a_plain_list_is_left_as_it_is(monkeypatch, capsys):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    fix_cuda_arch_list_for_deepspeed()
    assert capsys.readouterr().err == ""
