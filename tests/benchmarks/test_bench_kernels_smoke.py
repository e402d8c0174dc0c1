"""benchmarks/bench_kernels.py end to end on CPU at a tiny shape (Triton kernels in the interpreter,
tests/conftest.py; local_attention / global_attention: sdpa against the window kernels). A correctness smoke test of the script; it asserts nothing about speed."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_kernels

pytest.importorskip("triton", reason="the script's third variant is the Triton kernels")


def test_every_op_and_variant_runs_and_matches_the_reference(tmp_path):
    out = tmp_path / "kernels.json"
    fused_kernels = pytest.importorskip("modernbert_train.model.fused_kernels")
    assert not fused_kernels.interpret_cpu_tensors
    rc = bench_kernels.main(["--tokens", "40", "--preset", "tiny", "--device", "cpu", "--iters", "1",
                             "--out-json", str(out)])
    # The interpreter was on for the run only: later CPU models in this process run PyTorch ops.
    assert not fused_kernels.interpret_cpu_tensors
    results = {(r["op"], r["variant"]): r for r in json.loads(out.read_text())["results"]}
    assert rc == 0, [r["error"] for r in results.values()]
    assert sorted(results) == sorted((op, v) for op in ("geglu", "rotary_qkv", "layer_norm", "add_layer_norm",
                                                        "local_attention", "rotary_local_attention",
                                                        "global_attention")
                                     for v in ("eager", "compiled", "triton")), sorted(results)
    for key, r in results.items():
        assert r["error"] is None and r["fwd_ms"] > 0 and r["fwd_gb_s"] > 0, r
        # fp32 against an fp64 reference
        assert r["max_err_out"] < 1e-5 and r["max_err_grad"] < 1e-5, r
        assert (r["fwd_tflop_s"] is not None) == key[0].endswith("_attention"), r


def test_attention_backend_option_picks_the_backend_of_the_attention_rows(tmp_path, monkeypatch):
    """--attention-backend names the backend of the attention ops' eager and compiled rows (on the GPU:
    cudnn's global layer against torch_varlen's); an unavailable one stops with its reason."""
    asked = []
    real = bench_kernels.get_backend
    monkeypatch.setattr(bench_kernels, "get_backend", lambda name: asked.append(name) or real(name))
    out = tmp_path / "kernels.json"
    rc = bench_kernels.main(["--tokens", "40", "--preset", "tiny", "--device", "cpu", "--iters", "1",
                             "--ops", "global_attention", "--variants", "eager", "--attention-backend", "flex",
                             "--out-json", str(out)])
    (result,) = json.loads(out.read_text())["results"]
    # flex trains on the CPU with torch 2.7 only (model/attention.py flex_cpu_training_missing)
    assert result["op"] == "global_attention" and (rc == 0) == (result["error"] is None), (rc, result)
    assert set(asked) == {"flex"}, asked  # the default here would be sdpa
    with pytest.raises(ValueError, match="attention backend 'cudnn' is not available"):
        bench_kernels.main(["--tokens", "40", "--preset", "tiny", "--device", "cpu", "--iters", "1",
                            "--ops", "global_attention", "--attention-backend", "cudnn",
                            "--out-json", str(out)])
