"""benchmarks/inductor_kernels.py on the tiny preset: Inductor's CUDA kernels for one layer,
generated and compiled for sm_90 on a machine without a GPU. Checks that the diagnostic runs and
reads what it claims; the numbers themselves are recorded in benchmarks/README.md."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the diagnostic compiles Triton kernels")
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *args) -> list[dict]:
    out = tmp_path / f"kernels{len(list(tmp_path.glob('*.json')))}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real code generation
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.inductor_kernels", "--preset", "tiny", "--tokens", "256",
                           *args, "--out-json", str(out)], env=env, capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(out.read_text())["kernels"]


def test_layer_kernels_are_generated_for_the_gpu_and_compiled(tmp_path):
    inductor = _run(tmp_path)
    ours = _run(tmp_path, "--ours-only")
    assert {k["graph"] for k in inductor} == {"forward", "backward"}, inductor
    for kernel in inductor:
        assert kernel["error"] is None and kernel["variants"] and kernel["instr_per_element"] > 0, kernel
        assert kernel["elements"] > 0 and all(v["loads"] and v["stores"] for v in kernel["variants"]), kernel
    # The GeGLU backward (tiny: 256 tokens x 2 x 256): Inductor's kernel and ours, same elements.
    inductor_geglu = [k for k in inductor if k["graph"] == "backward" and k["elements"] == 256 * 2 * 256]
    ours_geglu = [k for k in ours if k["name"] == "ours: _geglu_bwd"]
    assert len(inductor_geglu) == 1 and len(ours_geglu) == 1, (inductor_geglu, ours_geglu)
    assert ours_geglu[0]["elements"] == inductor_geglu[0]["elements"]
    # Kernels that the host code runs more than once are counted per launch (the norm's weight
    # gradient reduction: once for each of the layer's two norms).
    assert max(k["launches"] for k in inductor) >= 2, [(k["name"], k["launches"]) for k in inductor]
    # What model/fused_kernels.py is for (torch 2.7's Inductor): the generated GeGLU backward needs
    # at least twice the instructions per element (measured 110 vs 31).
    assert inductor_geglu[0]["instr_per_element"] >= 2 * ours_geglu[0]["instr_per_element"], (
        inductor_geglu[0]["instr_per_element"], ours_geglu[0]["instr_per_element"])


def test_head_and_loss_kernels_compile_and_write_the_gradient_in_bf16(tmp_path):
    """The MLM head with the fused decoder + loss (model/linear_cross_entropy.py): the logits'
    gradient goes from the logits to bf16 in the kernel that computes it (no fp32 copy in memory:
    the one-hot is a comparison, not an in-place scatter)."""
    kernels = _run(tmp_path, "--part", "head")
    assert kernels and all(k["error"] is None for k in kernels), kernels
    masked, vocab = int(0.3 * 256), 4096
    assert not [k["name"] for k in kernels if "scatter" in k["name"]], [k["name"] for k in kernels]
    gradient = [k for k in kernels if k["elements"] == masked * vocab and "where" in k["name"]]
    assert len(gradient) == 1, [(k["name"], k["elements"]) for k in kernels]
    # What it writes per logit (not per row: torch 2.11's Inductor reduces the logsumexp in the
    # same kernel and stores it, fp32, once per row): a pointwise kernel's stores span all its
    # elements, a reduction kernel's only those indexed along the reduction (vocabulary) axis.
    kernel = gradient[0]
    pointwise = kernel["name"].startswith("triton_poi")
    per_logit = {kernel["signature"][pointer] for pointer, offsets in kernel["store_offsets"].items()
                 if pointwise or any(re.search(r"\br\d", offset) for offset in offsets)}
    assert per_logit == {"*bf16"}, (kernel["name"], kernel["signature"], kernel["store_offsets"])
