"""benchmarks/bench_step.py end to end on the tiny CPU config: both systems run on the same tokens.

A correctness smoke test of the script; it asserts nothing about speed.
"""
from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import bench_step
from modernbert_train.data import synthetic
from modernbert_train.data.chunk_layout import doc_slots
from modernbert_train.model.config import preset
from tests.host_syncs import DeviceResidency, HostSyncDetector


def test_main_writes_both_systems_on_identical_tokens(tmp_path):
    out = tmp_path / "step.json"
    rc = bench_step.main(["--preset", "tiny", "--seq-len", "128", "--seqs-per-chunk", "8", "--steps", "1",
                          "--warmup", "1", "--num-chunks", "2", "--device", "cpu", "--out-json", str(out)])
    payload = json.loads(out.read_text())
    results = {r["system"]: r for r in payload["results"]}
    assert rc == 0, [r["error"] for r in payload["results"]]
    assert sorted(results) == ["hf", "ours"], sorted(results)
    ours, hf = results["ours"], results["hf"]
    for r in (ours, hf):
        assert r["error"] is None and r["tokens_per_s"] > 0, r
        assert np.isfinite(r["loss_first"]) and r["model_tflop_per_step"] > 0, r
    # Counted independently from each layout (num_tokens vs attention_mask, labels vs labels).
    assert ours["real_tokens_per_step"] == hf["real_tokens_per_step"], (ours, hf)
    assert ours["masked_tokens_per_step"] == hf["masked_tokens_per_step"], (ours, hf)
    assert ours["chunk_tokens"] == hf["chunk_tokens"] == 8 * 128
    assert ours["ratio_vs_hf"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    assert payload["args"]["backend"] == "sdpa" and payload["args"]["compile"] == "none"
    assert "12 * hidden * attended_pairs" in payload["flop_formula"]


def test_step_batch_layouts_hold_the_same_tokens_and_loader_shapes():
    cfg = preset("tiny")
    batch = bench_step.build_step_batches(cfg, seq_len=128, seqs_per_chunk=4, num_chunks=1, seed=3)[0]
    packed, padded = batch.packed, batch.padded
    rows = [packed_row[mask.bool()] for packed_row, mask in zip(padded["input_ids"], padded["attention_mask"])]
    real = int(packed["num_tokens"])
    assert torch.equal(torch.cat(rows), packed["input_ids"][:real])
    assert (packed["input_ids"][real:] == cfg.pad_token_id).all()
    assert torch.equal(padded["labels"][padded["attention_mask"].bool()], packed["labels"][:real])
    # cu_seqlens: the loader's layout, documents then the pad tail, slots rounded up to 64 and filled
    # with the repeated last value; `capacity` is the worst case.
    cu = packed["cu_seqlens"]
    assert cu.numel() == doc_slots(len(np.concatenate(batch.doc_lens)) + 1) + 1, cu.numel()
    assert packed["cu_seqlens_capacity"].numel() == 4 * 64 + 2
    assert torch.equal(packed["cu_seqlens_capacity"][:cu.numel()], cu)
    assert int(cu[0]) == 0 and int(cu[-1]) == 4 * 128 and bool((cu[1:] >= cu[:-1]).all())
    lens = np.concatenate(batch.doc_lens)
    assert (lens >= synthetic.MIN_DOC_TOKENS).all() and (lens <= 128).all(), lens
    assert torch.equal(cu[1:lens.size + 1].long(), torch.from_numpy(np.cumsum(lens))), cu[:lens.size + 1]
    starts = packed["position_ids"] == 0
    assert int(starts[:real].sum()) == lens.size, (int(starts[:real].sum()), lens.size)


def test_run_specs_parse_options_and_reject_bad_ones():
    spec = bench_step.RunSpec.parse("ours:torch_varlen:full:mem=0.7:cdt")
    assert (spec.memory_budget, spec.coordinate_descent_tuning, spec.label) == (0.7, True, "mem=0.7,cdt"), spec
    assert bench_step.RunSpec.parse("hf:sdpa:full").label == "-"
    assert bench_step.build_ours(preset("tiny"), bench_step.RunSpec.parse("ours:sdpa:full")).config.fused_kernels
    compiler_ops = bench_step.RunSpec.parse("ours:sdpa:full:-triton")
    assert (compiler_ops.fused_kernels, compiler_ops.label) == (False, "-triton"), compiler_ops
    assert not bench_step.build_ours(preset("tiny"), compiler_ops).config.fused_kernels
    default = bench_step.RunSpec.parse("ours:sdpa:full")
    assert (default.window_attention_kernel, default.label) == (True, "-"), default
    assert bench_step.build_ours(preset("tiny"), default).config.window_attention_kernel
    backend = bench_step.RunSpec.parse("ours:sdpa:full:-win")
    assert (backend.window_attention_kernel, backend.label) == (False, "-win"), backend
    assert not bench_step.build_ours(preset("tiny"), backend).config.window_attention_kernel
    bf16_stream = bench_step.RunSpec.parse("ours:sdpa:full:bf16res")
    assert (bf16_stream.autocast_residual, bf16_stream.label) == (True, "bf16res"), bf16_stream
    assert bench_step.build_ours(preset("tiny"), bf16_stream).config.autocast_residual
    assert not bench_step.build_ours(preset("tiny"), default).config.autocast_residual
    rope = bench_step.RunSpec.parse("ours:sdpa:full:winrope")
    assert (rope.window_attention_kernel, rope.window_attention_rope, rope.label) == (True, True, "winrope"), rope
    built = bench_step.build_ours(preset("tiny"), rope).config
    assert built.window_attention_kernel and built.window_attention_rope, built
    assert not bench_step.build_ours(preset("tiny"), default).config.window_attention_rope
    whole = bench_step.RunSpec.parse("ours:sdpa:full:gwin")
    assert (whole.global_attention_kernel, whole.label) == (True, "gwin"), whole
    assert bench_step.build_ours(preset("tiny"), whole).config.global_attention_kernel
    assert not bench_step.build_ours(preset("tiny"), default).config.global_attention_kernel
    norm = bench_step.RunSpec.parse("ours:sdpa:full:lnk")
    assert (norm.fused_layer_norm, norm.label) == (True, "lnk"), norm
    assert bench_step.build_ours(preset("tiny"), norm).config.fused_layer_norm
    assert not bench_step.build_ours(preset("tiny"), default).config.fused_layer_norm
    for bad in ["ours:torch_varlen:full:mem=1.5", "hf:sdpa:full:triton", "ours:torch_varlen:full:mem=x", "ours:torch_varlen:full:fast",
                "hf:sdpa:full:cdt", "hf:sdpa:full:mem=0.7", "hf:sdpa:full:-triton", "ours:sdpa:full:triton", "ours:sdpa:full:ce", "hf:sdpa:full:-win", "ours:sdpa:full:win", "ours:sdpa:full:-win:winrope", "hf:sdpa:full:winrope", "hf:sdpa:full:gwin", "hf:sdpa:full:lnk", "hf:sdpa:full:bf16res", "ours:torch_varlen:jit"]:
        with pytest.raises(ValueError, match="run spec"):
            bench_step.RunSpec.parse(bad)


@pytest.mark.parametrize("compile_mode", ["none", "full"])
def test_saved_activations_mode_counts_what_backward_keeps(tmp_path, compile_mode):
    """fp32 on CPU: the plain decoder + cross-entropy (-fused) keeps the (prediction slots, vocab)
    probabilities for backward; the fused loss recomputes its logits chunk by chunk and keeps none."""
    out = tmp_path / "saved.json"
    rc = bench_step.main(["--preset", "tiny", "--seq-len", "128", "--seqs-per-chunk", "8", "--device", "cpu",
                          "--saved-activations", "--runs", f"ours:sdpa:{compile_mode}",
                          f"ours:sdpa:{compile_mode}:-fused", "--out-json", str(out)])
    torch._dynamo.reset()
    rows = {r["options"]: r for r in json.loads(out.read_text())["results"]}
    assert rc == 0 and sorted(rows) == ["-", "-fused"], rows
    ours, plain = rows["-"], rows["-fused"]
    assert ours["chunk_tokens"] == 8 * 128
    assert ours["saved_bytes"] == sum(ours["groups"].values())
    vocab = preset("tiny").vocab_size

    def logits(row):
        return {group: size for group, size in row["groups"].items() if group.endswith(f", {vocab}) float32")}

    assert logits(ours) == {} and len(logits(plain)) == 1, (ours["groups"], plain["groups"])
    (group, size), = logits(plain).items()
    slots = int(group[1:].split(",")[0])
    assert size == slots * vocab * 4 and slots >= 0.25 * 8 * 128, (group, size)  # 30% masked
    assert plain["saved_bytes"] > ours["saved_bytes"], (plain["saved_bytes"], ours["saved_bytes"])


def test_a_run_whose_loss_is_not_finite_fails_and_gets_no_ratio(tmp_path, monkeypatch):
    """A step that computes NaN may run fast (the 2026-11-27 H200 run: 528k tok/s with NaN loss): such a
    run is an error in the table, JSON and exit code, and gets no ratio against transformers."""
    real_build = bench_step.build_ours

    def poisoned(cfg, spec):
        model = real_build(cfg, spec)
        with torch.no_grad():
            model.model.layers[0].mlp.Wo.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(bench_step, "build_ours", poisoned)
    out = tmp_path / "step.json"
    rc = bench_step.main(["--preset", "tiny", "--seq-len", "128", "--seqs-per-chunk", "4", "--steps", "1",
                          "--warmup", "1", "--num-chunks", "1", "--device", "cpu", "--out-json", str(out)])
    results = {r["system"]: r for r in json.loads(out.read_text())["results"]}
    assert rc == 1
    assert results["ours"]["error"].startswith("FloatingPointError: non-finite training loss"), results["ours"]
    assert results["ours"]["ratio_vs_hf"] is None and results["ours"]["tokens_per_s"] > 0
    assert results["hf"]["error"] is None


def test_runs_of_ours_must_agree_on_the_first_loss():
    def result(options, loss):
        return bench_step.RunResult(system="ours", attention="sdpa", compile="none", options=options,
                                    dtype="fp32", chunk_tokens=1024, loss_first=loss)

    runs = [result("-", 10.90), result("cdt", 10.95), result("win", 11.30)]
    bench_step.check_losses(runs)
    assert runs[0].error is None and runs[1].error is None  # 0.5%: rounding
    assert "differs from 10.9000" in runs[2].error  # 3.7%: another computation


class _StubMLM(torch.nn.Module):
    """Takes our model's inputs and makes a loss from them without reading anything back, so that
    any read recorded in the timed steps is the benchmark loop's own."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)

    def forward(self, input_ids, labels, **_):
        return SimpleNamespace(loss=(self.emb(input_ids).sum(-1) * (labels != -100)).mean())


def test_timed_steps_never_read_a_value_back_from_the_device(monkeypatch):
    """The timed steps run back to back: a value read back from the GPU inside them (a token count,
    the loss) would make the host wait for the device and idle it while the next step starts.
    Emulated on the CPU: the batches stand for GPU tensors (tests/host_syncs.py's DeviceResidency),
    a stub model and plain SGD make the step itself read nothing, and every read in each timed
    window is recorded. The losses are read once all windows are done."""
    cfg = preset("tiny")
    batches = bench_step.build_step_batches(cfg, seq_len=128, seqs_per_chunk=4, num_chunks=2, seed=1)
    residency = DeviceResidency()
    for batch in batches:
        for tensor in list(batch.packed.values()) + list(batch.padded.values()):
            if torch.is_tensor(tensor):
                residency.mark(tensor)
    windows = []
    real_window = bench_step.timed_window

    def watched(step, indices, device):
        with HostSyncDetector(residency) as detector:
            out = real_window(step, indices, device)
        windows.append((list(indices), detector.syncs))
        return out

    monkeypatch.setattr(bench_step, "timed_window", watched)
    monkeypatch.setattr(bench_step, "build_ours", lambda cfg, spec: _StubMLM(cfg.vocab_size))
    monkeypatch.setattr(bench_step, "build_optimizer",
                        lambda model, device: torch.optim.SGD(model.parameters(), lr=0.1, foreach=False))
    result = bench_step.run_config(bench_step.RunSpec("ours", "sdpa", "none"), cfg, batches,
                                   device=torch.device("cpu"), dtype="fp32", warmup=1, steps=3,
                                   synced_steps=2, peak_flops=None, seed=0)
    assert result.error is None, result.error
    assert [indices for indices, _ in windows] == [[0], [1, 2, 3], [4], [5]], windows
    assert all(not syncs for _, syncs in windows), windows
    # The counts the steps report were made on the host, from the same tokens.
    real, masked = batches[0].counts["ours"]
    assert real == int(batches[0].packed["num_tokens"]) and real == batches[0].counts["hf"][0]
    assert masked == int((batches[0].packed["labels"] != -100).sum()) == batches[0].counts["hf"][1]
    assert result.real_tokens_per_step == sum(b.counts["ours"][0] for b in (batches[1], batches[0], batches[1])) / 3
    assert result.synced_steps == 2 and result.tokens_per_s_synced > 0 and result.step_ms_synced_median > 0
    assert np.isfinite(result.loss_first) and result.loss_first != result.loss_last, result


def test_profile_keeps_more_kernels_in_the_json_than_it_prints(tmp_path, capsys):
    out = tmp_path / "step.json"
    rc = bench_step.main(["--preset", "tiny", "--seq-len", "128", "--seqs-per-chunk", "4", "--steps", "1",
                          "--warmup", "1", "--num-chunks", "1", "--device", "cpu", "--baseline", "none",
                          "--profile", "1", "--out-json", str(out)])
    (ours,) = json.loads(out.read_text())["results"]
    kernels = ours["top_kernels"]
    assert rc == 0 and len(kernels) > bench_step.PRINTED_KERNELS, len(kernels)
    assert [k["ms_per_step"] for k in kernels] == sorted((k["ms_per_step"] for k in kernels), reverse=True)
    assert 0 < sum(k["share"] for k in kernels) <= 1 + 1e-9
    after_header = capsys.readouterr().out.split("top kernels, ", 1)[1].splitlines()[1:]
    rows = list(itertools.takewhile(lambda line: line.startswith("  "), after_header))
    assert len(rows) == bench_step.PRINTED_KERNELS, rows
    assert rows[-1].endswith(kernels[bench_step.PRINTED_KERNELS - 1]["name"]), rows[-1]
