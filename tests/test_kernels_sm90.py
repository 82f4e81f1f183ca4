"""The Triton kernels compiled for the H100 (sm_90) on this GPU-less machine, as the JIT would
compile each launch the backend makes for Maverick's shapes: they must compile, spill nothing,
and read their inputs in wide loads (no byte-by-byte or 2-byte reads of the codes or inputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

if not os.environ.get("MAVERICK_QUANT_REQUIRE_CLIENTS"):  # CI installs triton and requires these tests
    pytest.importorskip("triton")

from maverick_quant.triton_sm90 import KernelCost, load_bytes  # noqa: E402


@pytest.fixture(scope="module")
def sm90_costs() -> list[KernelCost]:
    """Compiled in a subprocess: this process runs under TRITON_INTERPRET=1 (conftest.py), where
    `triton.jit` makes nothing that compiles."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-m", "maverick_quant.triton_sm90", "--json"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [KernelCost(**row) for row in json.loads(result.stdout)]


def test_load_widths_are_read_from_ptx_variants() -> None:
    assert [load_bytes(v) for v in ("b8", "b16", "b32", "v2.b32", "v4.b32", "nc.v4.b32", "v2.b16")] == [1, 2, 4, 8, 16, 16, 4]
    with pytest.raises(ValueError, match="v4.f"):
        load_bytes("v4.f")


def test_every_triton_launch_compiles_for_the_h100_without_spilling(sm90_costs) -> None:
    cases = {cost.case for cost in sm90_costs}
    for needed in ("gemv qkv M=1 g32 asym", "gemv expert gate+up top-1 g128 sym", "gemm expert down 256 tokens g128 asym",
                   "gemm qkv M=64 g128 sym fp32", "dequantize qkv g128 asym"):
        assert needed in cases
    for cost in sm90_costs:
        assert cost.spill_bytes == 0, cost
        assert cost.registers <= 255, cost


def test_the_gemv_and_dequantize_kernels_read_each_threads_codes_in_one_16_byte_load(sm90_costs) -> None:
    """At M = 1 the GEMV's speed is the speed it streams the codes: each thread's 16 bytes of a
    [32, 64]-byte tile come in one 16-byte load (the row length K/2 is passed in, so the JIT
    knows rows start 16-byte aligned), and the activations are not re-read 2 bytes at a time
    per code pair (a 2-byte load of x and of the scale are left in the loop: at most 3 in all,
    20 before). The sweep's tilings read their codes at least 8 bytes at a time."""
    for cost in sm90_costs:
        if not cost.kernel.startswith(("_w4_gemv", "_w4_dequantize")):
            continue
        if " warps" in cost.case:  # the tilings kernel_speed --sweep-gemv times: 8 to 64 bytes per thread
            assert cost.widest_code_load_bytes() >= 8, cost
        else:  # the default tiling: 16 bytes of codes per thread
            assert cost.global_loads.get("v4.b32") == 1 and cost.widest_code_load_bytes() == 16, cost
        assert cost.global_loads.get("b16", 0) <= 3, cost


def test_the_gemm_copies_its_input_and_code_tiles_asynchronously_in_wide_copies(sm90_costs) -> None:
    """Past decode, the tiles of x and of the codes are pipelined by cp.async; the x tile is
    read contiguously, so on groups of 64 and 128 its copies are 16 bytes wide. No scalar
    2-byte reads of x are left (the scales are the one 2-byte load in the loop)."""
    for cost in sm90_costs:
        if not cost.kernel.startswith("_w4_gemm"):
            continue
        assert cost.async_copy_bytes, cost
        if " g32 " not in cost.case:
            assert "16" in cost.async_copy_bytes, cost
        assert cost.global_loads.get("b16", 0) <= 2, cost
