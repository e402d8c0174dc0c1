"""train/compile.py: compiling leaves the model's names alone; chunks with different document counts
share one graph; the compiled fast path (GPU) matches the eager reference path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modernbert_train.data.loader import collate_chunk
from modernbert_train.model.attention import flex_cpu_training_missing, unavailable_reason
from modernbert_train.model.config import preset
from modernbert_train.model.modernbert import ModernBertForMaskedLM
from modernbert_train.train.compile import compile_model, mark_varlen_dims
from modernbert_train.train.composer_model import chunk_inputs
from tests.data.test_loader import PAD, VOCAB, make_masker


def tiny_model(**overrides) -> ModernBertForMaskedLM:
    cfg = preset("tiny")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return ModernBertForMaskedLM(cfg)


@pytest.mark.parametrize("mode", ["none", "regional", "full"])
def test_compiling_keeps_parameter_names_and_state_dict(mode):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert compile_model(model, mode) is model
    after = model.state_dict()
    assert list(after) == list(before), "checkpoints must not see compile wrappers (_orig_mod)"
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        compile_model(tiny_model(), "fast")


def test_memory_budget_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="memory_budget=0.0"):
        compile_model(tiny_model(), "full", memory_budget=0.0)


@pytest.fixture
def restore_memory_budget():
    """compile_model sets the process-wide budget; put the value back for the tests that follow.
    (Not monkeypatch: pytest 9.2's undo restores only what it finds in the target's __dict__, and torch's
    config modules keep their values elsewhere, so its undo deleted the option for later tests.)"""
    before = torch._functorch.config.activation_memory_budget
    yield
    torch._functorch.config.activation_memory_budget = before


def test_lower_memory_budget_saves_fewer_activations(restore_memory_budget):
    """The budget reaches the compiler's partitioner: the compiled step keeps less for backward
    (counted through saved-tensor hooks, which see what the compiled graph saves)."""
    saved_bytes = {}
    for budget in (1.0, 0.3):
        torch._dynamo.reset()
        model = compile_model(tiny_model(num_hidden_layers=2, attention_backend="sdpa"), "full", budget)
        batch = packed_batch(torch.device("cpu"), docs=(300, 17, 500, 2, 100, 99))
        total = [0]

        def count(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        saved_bytes[budget] = total[0]
    torch._dynamo.reset()
    assert saved_bytes[0.3] < 0.75 * saved_bytes[1.0], saved_bytes


def uniform_chunk(doc_len: int, seqs: int = 8, seq_len: int = 128) -> dict:
    """A loader chunk (collate_chunk) of `seqs` sequences cut into documents of `doc_len` tokens."""
    rng = np.random.default_rng(doc_len)
    n = seq_len // doc_len
    samples = [dict(input_ids=rng.integers(5, VOCAB, n * doc_len).astype(np.uint16),
                    doc_lens=np.full(n, doc_len, np.int32), doc_ids=np.arange(n, dtype=np.int64), sample_idx=i)
               for i in range(seqs)]
    return collate_chunk(samples, max_seq_len=seq_len, microbatch_seqs=seqs, pad_id=PAD, masker=make_masker(0),
                         epoch=0)


@pytest.mark.parametrize("bf16_stream", [False, True], ids=["default", "autocast_residual"])
def test_chunks_of_any_document_count_share_one_graph_without_breaks(bf16_stream):
    """The loader rounds a chunk's document slots up to a multiple of 64, so their count changes from
    chunk to chunk (here 64 and 128 slots); every other shape is fixed by the chunk layout.
    chunk_inputs marks that one dimension dynamic, so nothing recompiles; fullgraph=True fails on any
    graph break (a host sync in the forward pass would be one). Dynamo decides both, whichever
    compiler builds the graph (aot_eager here: Inductor cannot build FlexAttention on the CPU with
    torch 2.7, and sdpa, the CPU reference, reads document lengths back by design). With
    model.autocast_residual under bf16 autocast too: the autocast state it reads in forward is
    folded into the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    if flex_cpu_training_missing():
        pytest.skip(flex_cpu_training_missing())
    cfg = preset("tiny")
    cfg.attention_backend, cfg.autocast_residual = "flex", bf16_stream
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.manual_seed(0)
    model = torch.compile(ModernBertForMaskedLM(cfg).train(), backend=counter, fullgraph=True)
    slots = []
    for doc_len in (64, 8, 32):  # 16 documents, 128, 32 (+ none for the pad tail: the chunks are full)
        chunk = uniform_chunk(doc_len)
        slots.append(chunk["cu_seqlens"].numel() - 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_stream):
            loss = model(**chunk_inputs(chunk)).loss
        loss.backward()
        assert torch.isfinite(loss), (doc_len, loss)
    torch._dynamo.reset()
    assert slots == [64, 128, 64], slots
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for document slots {slots}"


def packed_batch(device, seed=0, docs=(300, 17, 440, 2, 500, 99), slots=128):
    g = torch.Generator().manual_seed(seed)
    total = sum(docs)
    ids = torch.randint(4, 4096, (total,), generator=g)
    labels = torch.where(torch.rand(total, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    cu = torch.zeros(slots + 1, dtype=torch.int32)
    cu[1:len(docs) + 1] = torch.tensor(docs).cumsum(0)
    cu[len(docs) + 1:] = total
    slots_needed = int((labels != -100).sum()) + 64
    return dict(input_ids=ids.to(device), labels=labels.to(device), cu_seqlens=cu.to(device),
                max_seqlen=max(docs), prediction_slots=slots_needed)


@pytest.mark.gpu
@pytest.mark.parametrize("backend, mode", [("torch_varlen", "regional"), ("torch_varlen", "full"),
                                           ("flex", "regional"), ("flash", "regional")])
def test_compiled_fast_path_matches_eager_reference(backend, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend} not available here: {reason}")
    torch._dynamo.reset()
    ref = tiny_model(attention_backend="sdpa", fused_head_loss=False).cuda().train()
    fast = tiny_model(attention_backend=backend, fused_head_loss=True).cuda().train()
    fast.load_state_dict(ref.state_dict())
    compile_model(fast, mode)
    for seed in range(3):  # other documents each time (and another T: Dynamo may recompile once; the loader
        # keeps T fixed, see test_chunks_of_any_document_count_share_one_graph_without_breaks)
        batch = packed_batch("cuda", seed=seed, docs=(300, 17, 440, 2, 500, 99)[seed:])
        mark_varlen_dims(batch["cu_seqlens"])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_fast = fast(**batch).loss
        loss_ref = ref(**{k: v for k, v in batch.items() if k != "prediction_slots"}).loss
        assert abs(loss_fast.item() - loss_ref.item()) < 2e-2 * loss_ref.item(), (loss_fast.item(), loss_ref.item())
        loss_fast.backward()
        loss_ref.backward()
        for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
            cos = torch.nn.functional.cosine_similarity(p_fast.grad.flatten().float(), p_ref.grad.flatten(), dim=0)
            assert cos > 0.99, f"{backend}/{mode} seed {seed}: grad of {name} cosine {cos.item():.4f}"
        fast.zero_grad()
        ref.zero_grad()
