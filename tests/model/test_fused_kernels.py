"""model/fused_kernels.py: the Triton GeGLU and RoPE kernels against the PyTorch definitions.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before any kernel is defined, and `interpret_cpu_tensors`, switched on here), so the CPU suite
checks the kernels' own indexing and math, not a fallback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modernbert_train.model.attention import get_backend
from modernbert_train.model.config import preset
from modernbert_train.model.modernbert import (AddNorm, ModernBertForMaskedLM, RotaryEmbedding, geglu_activation,
                                               pointwise_ops, rotary_qkv)

pytest.importorskip("triton", reason="the fused kernels are written in Triton")
from modernbert_train.model import fused_kernels, window_attention  # noqa: E402 - only where triton is installed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernels_take_cpu_tensors_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(fused_kernels, "interpret_cpu_tensors", True)
# Computed in fp32, rounded once to bf16: within 2^-8 relative of an exact reference on the GPU
# (round to nearest); Triton's interpreter truncates, within 2^-7.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6),
             torch.bfloat16: dict(rtol=2 ** -8 if torch.cuda.is_available() else 2 ** -7, atol=1e-5)}


def _exact(fn, *inputs, grads):
    """fn's outputs and the first input's gradient, in fp64 from the same (rounded) inputs."""
    first = inputs[0].detach().double().requires_grad_()
    rest = [t.double() for t in inputs[1:]]
    outs = fn(first, *rest)
    outs = outs if isinstance(outs, tuple) else (outs,)
    (grad,) = torch.autograd.grad(outs, first, [g.double() for g in grads])
    return outs, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_geglu_matches_exact_gelu_times_gate(dtype):
    """37 rows x 200 columns per half: neither a multiple of the kernel's 16 x 128 blocks."""
    gen = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(37, 400, generator=gen)).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(37, 200, generator=gen).to(DEVICE, dtype)
    assert fused_kernels.use_triton(h), "the test must exercise the kernel, not the CPU fallback"
    out = fused_kernels.geglu(h)
    (dh,) = torch.autograd.grad(out, h, grad)
    (want,), want_dh = _exact(geglu_activation, h, grads=[grad])
    assert out.dtype == dh.dtype == dtype and out.shape == (37, 200)
    torch.testing.assert_close(out.double(), want, **TOLERANCE[dtype])
    torch.testing.assert_close(dh.double(), want_dh, **TOLERANCE[dtype])


def _rotary_inputs(tokens: int, heads: int, head_dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    positions = torch.randint(0, 300, (tokens,), generator=gen)
    cos, sin = (t.to(DEVICE) for t in RotaryEmbedding(head_dim, 10_000.0, 300)(positions))
    return qkv, cos, sin


@pytest.mark.parametrize("head_dim", [16, 12], ids=["half8", "half6-masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_qkv_matches_reference_and_passes_v_through(dtype, head_dim):
    qkv, cos, sin = _rotary_inputs(tokens=45, heads=3, head_dim=head_dim, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(45, 3, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(3)]
    outs = fused_kernels.rotary_qkv(qkv, cos, sin)
    (dqkv,) = torch.autograd.grad(outs, qkv, grads)
    want, want_dqkv = _exact(rotary_qkv, qkv, cos, sin, grads=grads)
    for got, ref, name in zip(outs, want, "qkv"):
        assert got.is_contiguous() and got.shape == (45, 3, head_dim), (name, got.shape)
        torch.testing.assert_close(got.double(), ref, **TOLERANCE[dtype], msg=f"output {name}")
    torch.testing.assert_close(dqkv.double(), want_dqkv, **TOLERANCE[dtype])
    assert torch.equal(outs[2], qkv[:, 2]) and torch.equal(dqkv[:, 2], grads[2]), "v and dv are copied exactly"
    assert not torch.equal(outs[0], qkv[:, 0]), "q was rotated"


def test_rotary_qkv_backward_with_an_unused_output():
    """Only q and k reach the loss: v's gradient is None inside the op's backward."""
    qkv, cos, sin = _rotary_inputs(tokens=20, heads=2, head_dim=8, dtype=torch.float32)
    q, k, _ = fused_kernels.rotary_qkv(qkv, cos, sin)
    (q.square().sum() + k.sum()).backward()
    ref = qkv.detach().clone().requires_grad_()
    rq, rk, _ = rotary_qkv(ref, cos, sin)
    (rq.square().sum() + rk.sum()).backward()
    torch.testing.assert_close(qkv.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(qkv.grad[:, 2], torch.zeros_like(qkv.grad[:, 2]))


def _torch_layer_norm(x, weight, eps=1e-5):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, eps=eps)


def _assert_weight_grad_and_stats(dw, mean, rstd, want_dw, normed):
    """dw against its fp64 reference; the saved mean and 1 / std against those of `normed` (fp64)."""
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.double(), normed.detach().mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), normed.detach().var(-1, unbiased=False).add(1e-5).rsqrt(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("programs", [1024, 4], ids=["a-program-per-row", "ragged-rows-per-program"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_norm_matches_torch_forward_and_backward(dtype, programs, monkeypatch):
    """37 rows of 96 (neither a multiple of the kernel's row blocks nor a power of two); the weight
    gradient from per-program partial sums, with one row per program and with 10 (the last
    program 7) in blocks of the kernel's rows."""
    monkeypatch.setattr(fused_kernels, "_LAYER_NORM_BWD_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(37, 96, generator=gen) + 1).to(DEVICE, dtype).requires_grad_()
    weight = (torch.rand(96, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    dy = torch.randn(37, 96, generator=gen).to(DEVICE, dtype)
    assert fused_kernels.use_triton(x), "the test must exercise the kernel, not the CPU fallback"
    y, mean, rstd = fused_kernels.layer_norm(x, weight, 1e-5)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    ref_x, ref_w = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = _torch_layer_norm(ref_x, ref_w)
    want_dx, want_dw = torch.autograd.grad(want, (ref_x, ref_w), dy.double())
    assert y.dtype == dx.dtype == dtype and dw.dtype == torch.float32 and y.shape == (37, 96)
    torch.testing.assert_close(y.double(), want, **TOLERANCE[dtype])
    torch.testing.assert_close(dx.double(), want_dx, **TOLERANCE[dtype])
    _assert_weight_grad_and_stats(dw, mean, rstd, want_dw, ref_x)


@pytest.mark.parametrize("programs", [1024, 4], ids=["a-program-per-row", "ragged-rows-per-program"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.float32, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.float32)],
                         ids=["fp32-stream+bf16-branch->bf16", "fp32", "bf16-stream->fp32"])
def test_add_layer_norm_matches_torch_forward_and_backward(dtypes, programs, monkeypatch):
    """s = x + delta and y = norm(s) in one pass; backward: x's gradient is ds plus the norm's, the
    same rounded to delta's dtype for delta. 37 rows of 96, as above. The first case is the model's
    under autocast: an fp32 stream, a bf16 branch output, the norm written in bf16 for a matmul."""
    x_dtype, delta_dtype, out_dtype = dtypes
    monkeypatch.setattr(fused_kernels, "_LAYER_NORM_BWD_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(6)
    x = (3 * torch.randn(37, 96, generator=gen) + 1).to(DEVICE, x_dtype).requires_grad_()
    delta = torch.randn(37, 96, generator=gen).to(DEVICE, delta_dtype).requires_grad_()
    weight = (torch.rand(96, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    ds = torch.randn(37, 96, generator=gen).to(DEVICE, x_dtype)
    dy = torch.randn(37, 96, generator=gen).to(DEVICE, out_dtype)
    assert fused_kernels.use_triton(x), "the test must exercise the kernel, not the CPU fallback"
    s, y, mean, rstd = fused_kernels.add_layer_norm(x, delta, weight, 1e-5, out_dtype)
    dx, ddelta, dw = torch.autograd.grad((s, y), (x, delta, weight), (ds, dy))
    assert (s.dtype, y.dtype, dx.dtype, ddelta.dtype, dw.dtype) == (x_dtype, out_dtype, x_dtype, delta_dtype,
                                                                    torch.float32)
    torch.testing.assert_close(s.double(), x.detach().double() + delta.detach().double(), **TOLERANCE[x_dtype])
    # the norm of the sum as stored
    ref_s, ref_w = s.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want_y = _torch_layer_norm(ref_s, ref_w)
    want_ds, want_dw = torch.autograd.grad(want_y, (ref_s, ref_w), dy.double())
    want_dx = want_ds + ds.double()
    torch.testing.assert_close(y.double(), want_y, **TOLERANCE[out_dtype])
    torch.testing.assert_close(dx.double(), want_dx, **TOLERANCE[x_dtype])
    torch.testing.assert_close(ddelta.double(), want_dx, **TOLERANCE[delta_dtype])
    _assert_weight_grad_and_stats(dw, mean, rstd, want_dw, ref_s)


def test_add_layer_norm_backward_when_one_tensor_is_both_gradients():
    """All fp32, the same tensor handed in as the gradient of s and of y: still the sum of both."""
    gen = torch.Generator().manual_seed(8)
    x, delta = (torch.randn(9, 32, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    weight, grad = torch.ones(32, device=DEVICE), torch.randn(9, 32, generator=gen).to(DEVICE)
    s, y, _, _ = fused_kernels.add_layer_norm(x, delta, weight, 1e-5, torch.float32)
    dx, ddelta = torch.autograd.grad((s, y), (x, delta), (grad, grad))
    ref_s = (x + delta).detach().double().requires_grad_()
    (want,) = torch.autograd.grad((ref_s, _torch_layer_norm(ref_s, weight.double())), ref_s,
                                  (grad.double(), grad.double()))
    torch.testing.assert_close(dx.double(), want, **TOLERANCE[torch.float32])
    torch.testing.assert_close(ddelta.double(), want, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("feeds_matmul", [True, False], ids=["feeds-a-matmul", "the-model-output"])
def test_add_norm_under_autocast_is_the_pytorch_modules_output_rounded_once(feeds_matmul):
    """fused_kernels.AddNorm against modernbert.AddNorm under bf16 autocast: the same stream (fp32)
    and norm; written in bf16 where only a matmul reads it (which would round it there), else in
    fp32, as autocast returns a norm."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 19, 64, generator=gen).to(DEVICE)
    delta = torch.randn(2, 19, 64, generator=gen).to(DEVICE, torch.bfloat16)
    plain = AddNorm(64, bias=False).to(DEVICE)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(64, generator=gen) + 0.5)
    fused = fused_kernels.AddNorm(64, bias=False, output_feeds_matmul=feeds_matmul).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want_s, want_y = plain(x, delta)
        s, y = fused(x, delta)
    assert (s.dtype, want_s.dtype, want_y.dtype) == (torch.float32,) * 3 and s.shape == y.shape == x.shape
    assert y.dtype == (torch.bfloat16 if feeds_matmul else torch.float32), y.dtype
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    torch.testing.assert_close(y.float(), want_y.to(y.dtype).float(), **TOLERANCE[y.dtype])


def test_cpu_path_without_the_interpreter_matches_the_kernels(monkeypatch):
    """CPU tensors outside the interpreter (e.g. a model trained with fused_kernels evaluated on a
    CPU) take the PyTorch path, forward and backward: the same numbers as the kernels."""
    if not fused_kernels._INTERPRET:
        pytest.skip("the kernels take CPU tensors only in Triton's interpreter (tests/conftest.py, no GPU)")
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(20, 24, generator=gen, requires_grad=True)
    grad = torch.randn(20, 12, generator=gen)
    qkv, cos, sin = _rotary_inputs(tokens=20, heads=2, head_dim=8, dtype=torch.float32)
    rotary_grads = [torch.randn(20, 2, 8, generator=gen) for _ in range(3)]
    # the norms (modules: they choose the path): the fp32 stream and a bf16 branch output
    x = torch.randn(20, 24, generator=gen, requires_grad=True)
    norm = fused_kernels.LayerNorm(24, eps=1e-5, bias=False)
    add_norm = fused_kernels.AddNorm(24, eps=1e-5, bias=False, output_feeds_matmul=True)
    with torch.no_grad():
        for module in (norm, add_norm):
            module.weight.copy_(torch.rand(24, generator=gen) + 0.5)
    delta = torch.randn(20, 24, generator=gen).bfloat16().requires_grad_()
    ds, dy = torch.randn(20, 24, generator=gen), torch.randn(20, 24, generator=gen)
    results = {}
    for kernels in (True, False):
        monkeypatch.setattr(fused_kernels, "use_triton", lambda x, on=kernels: on)
        out = fused_kernels.geglu(h)
        outs = fused_kernels.rotary_qkv(qkv, cos, sin)
        normed = norm(x)
        s, y = add_norm(x, delta)
        results[kernels] = ([out, *outs, normed, s, y], torch.autograd.grad(out, h, grad)
                            + torch.autograd.grad(outs, qkv, rotary_grads) + torch.autograd.grad(normed, (x, norm.weight), ds)
                            + torch.autograd.grad((s, y), (x, delta, add_norm.weight), (ds, dy)))
    for got, want in zip([*results[False][0], *results[False][1]], [*results[True][0], *results[True][1]]):
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        tolerance = dict(rtol=2 ** -7, atol=1e-5) if got.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, want, **tolerance)


def test_custom_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.compile
    relies on them."""
    qkv, cos, sin = _rotary_inputs(tokens=10, heads=2, head_dim=8, dtype=torch.float32)
    h = torch.randn(10, 12, device=DEVICE, requires_grad=True)
    torch.library.opcheck(fused_kernels.geglu_op, (h,))
    torch.library.opcheck(fused_kernels.rotary_qkv_op, (qkv, cos, sin))
    torch.library.opcheck(fused_kernels.geglu_backward, (h.detach(), torch.randn(10, 6, device=DEVICE)))
    x, weight = torch.randn(10, 24, device=DEVICE, requires_grad=True), torch.rand(24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(fused_kernels.layer_norm, (x, weight, 1e-5))
    delta = torch.randn(10, 24, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(fused_kernels.add_layer_norm, (x, delta, weight, 1e-5, torch.bfloat16))


def test_ops_compile_into_one_graph_with_their_gradients():
    """fullgraph=True: the custom ops (and their backward) cause no graph break under torch.compile."""
    qkv, cos, sin = _rotary_inputs(tokens=24, heads=2, head_dim=8, dtype=torch.float32)
    h = torch.randn(24, 12, device=DEVICE, requires_grad=True)
    weight = torch.rand(12, device=DEVICE, requires_grad=True)

    def step(qkv, h, weight):
        q, k, v = fused_kernels.rotary_qkv(qkv, cos, sin)
        normed = fused_kernels.layer_norm(h, weight, 1e-5)[0]
        return (q * k).sum() + v.sum() + fused_kernels.geglu(h).square().sum() + normed.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(qkv, h, weight), (qkv, h, weight))
    want = torch.autograd.grad(step(qkv, h, weight), (qkv, h, weight))
    torch._dynamo.reset()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _tiny_model(fused: bool) -> ModernBertForMaskedLM:
    cfg = preset("tiny")
    cfg.num_hidden_layers, cfg.attention_backend, cfg.local_attention = 3, "sdpa", 32
    cfg.fused_kernels = cfg.window_attention_kernel = cfg.fused_layer_norm = fused
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg)
    with torch.no_grad():  # norm weights other than their initial ones, so the weight matters
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.uniform_(0.5, 1.5)
    return model.to(DEVICE).train()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_model_with_fused_kernels_matches_pytorch_path(compiled):
    """Whole tiny model, fp32, every Triton kernel (GeGLU, RoPE, the local layers' window
    attention: model/window_attention.py, every LayerNorm) against the PyTorch path and the sdpa
    backend: the same loss and gradients, eager and Inductor-compiled."""
    ids = torch.randint(4, 4096, (160,), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.arange(160) % 3 == 0, ids, torch.full_like(ids, -100))
    batch = dict(input_ids=ids.to(DEVICE), labels=labels.to(DEVICE), max_seqlen=90,
                 cu_seqlens=torch.tensor([0, 50, 140, 160], dtype=torch.int32, device=DEVICE))
    results = {}
    for fused in (False, True):
        torch._dynamo.reset()
        model = _tiny_model(fused)
        assert (model.model.layers[0].mlp.act is fused_kernels.geglu) == fused
        norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]  # 2 + 2 x 3 layers - 1 + 1
        assert len(norms) == 8 and all(isinstance(m, (fused_kernels.LayerNorm, fused_kernels.AddNorm)) == fused
                                       for m in norms), norms
        local_backend, global_backend = (model.model.layers[i].attn.attend.args[1] for i in (1, 0))
        assert (local_backend is not global_backend) == fused  # the window kernel's wrapper on local layers
        forward = torch.compile(model) if compiled else model
        loss = forward(**batch).loss
        loss.backward()
        results[fused] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch._dynamo.reset()
    (loss_ref, grads_ref), (loss_fused, grads_fused) = results[False], results[True]
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-6, atol=1e-6)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_kernels_are_the_default_and_cpu_tensors_skip_the_interpreter_unless_asked(monkeypatch):
    """On by default (the GPU's faster path); a CPU training run under an inherited
    TRITON_INTERPRET=1 still computes in PyTorch, not step by step in the interpreter."""
    assert preset("tiny").fused_kernels and preset("base").fused_kernels
    assert pointwise_ops(preset("tiny")) == (fused_kernels.rotary_qkv, fused_kernels.geglu)
    monkeypatch.setattr(fused_kernels, "interpret_cpu_tensors", False)
    assert not fused_kernels.use_triton(torch.zeros(2))
    # ... and not through the custom ops either: their Python dispatch costs more than these CPU ops.
    h = torch.randn(4, 8, requires_grad=True)
    qkv, cos, sin = _rotary_inputs(tokens=4, heads=2, head_dim=8, dtype=torch.float32)
    backward_nodes = [fused_kernels.geglu(h).grad_fn.name()] + [t.grad_fn.name() for t in fused_kernels.rotary_qkv(
        qkv.cpu(), cos.cpu(), sin.cpu())[:2]]
    assert not any("modernbert" in name for name in backward_nodes), backward_nodes


def test_without_triton_the_window_kernel_warns_and_the_opt_ins_fail_naming_the_fix(monkeypatch):
    for module in ("fused_kernels", "window_attention"):
        monkeypatch.delitem(sys.modules, f"modernbert_train.model.{module}", raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    cfg = preset("tiny")
    cfg.fused_kernels = False  # (its warning is the next test's subject)
    assert cfg.window_attention_kernel  # the default
    with pytest.warns(UserWarning, match="window attention kernel needs triton.*model.window_attention_kernel=false"):
        model = ModernBertForMaskedLM(cfg)
    assert model.model.layers[1].attn.attend.args[1] is get_backend(cfg.attention_backend)
    cfg.window_attention_rope = True
    with pytest.raises(ImportError, match="model.window_attention_rope=true: the window attention kernel needs "
                                          "triton.*model.window_attention_rope=false"):
        ModernBertForMaskedLM(cfg)
    cfg.window_attention_rope, cfg.global_attention_kernel = False, True  # another opt-in
    with pytest.raises(ImportError, match="model.global_attention_kernel=true: the window attention kernel needs "
                                          "triton.*model.global_attention_kernel=false"):
        ModernBertForMaskedLM(cfg)
    cfg.global_attention_kernel, cfg.fused_layer_norm = False, True  # and another
    with pytest.raises(ImportError, match="model.fused_layer_norm=true needs triton.*model.fused_layer_norm=false"):
        ModernBertForMaskedLM(cfg)


def test_without_triton_a_warning_names_the_fix_and_the_pytorch_ops_run(monkeypatch):
    monkeypatch.delitem(sys.modules, "modernbert_train.model.fused_kernels")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    cfg = preset("tiny")
    with pytest.warns(UserWarning, match="triton is not importable.*model.fused_kernels=false"):
        assert pointwise_ops(cfg) == (rotary_qkv, geglu_activation)


def test_kernels_compile_for_hopper_with_128_bit_memory_access(tmp_path):
    """Triton's real code generation for sm_90, no GPU needed (benchmarks/inductor_kernels.py
    --ours-only), every autotuning config: it compiles (the interpreter accepts code that the
    compiler rejects), and each global load and store moves 16 bytes, as a memory-bound kernel must
    to approach bandwidth."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile now, not from an earlier run's cache
    out = tmp_path / "ours.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.inductor_kernels", "--ours-only", "--out-json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(out.read_text())["kernels"]
    assert [k["name"] for k in kernels] == ["ours: _geglu_fwd", "ours: _geglu_bwd", "ours: _rotary_qkv",
                                            "ours: _rotary_qkv backward",
                                            "ours: _window_fwd", "ours: _window_bwd_dkdv", "ours: _window_bwd_dq",
                                            "ours: _window_fwd rope", "ours: _window_bwd_dkdv rope",
                                            "ours: _window_bwd_dq rope", "ours: _window_fwd global",
                                            "ours: _window_bwd_dkdv global", "ours: _window_bwd_dq global",
                                            "ours: _layer_norm_fwd",
                                            "ours: _layer_norm_bwd", "ours: _layer_norm_fwd add",
                                            "ours: _layer_norm_bwd add"], kernels
    assert [len(k["variants"]) for k in kernels] == [len(fused_kernels._GEGLU_CONFIGS)] * 2 + [
        len(fused_kernels._rotary_qkv.configs)] * 2 + [len(window_attention._CONFIGS)] * 9 + [
        len(fused_kernels._NORM_CONFIGS)] * 4
    assert all(k["error"] is None for k in kernels), kernels
    for variant in (v for kernel in kernels[13:] for v in kernel["variants"]):  # the norms: rows of fp32 / bf16
        assert "ld.global.v4.b32" in variant["loads"] and "st.global.v4.b32" in variant["stores"], variant
    for kernel in kernels[:4]:
        for variant in kernel["variants"]:
            assert (variant["loads"], variant["stores"]) == (["ld.global.v4.b32"], ["st.global.v4.b32"]), (
                kernel["name"], variant)
    for variant in (v for kernel in kernels[4:13] for v in kernel["variants"]):  # window_attention.py: bf16 tiles
        # on tensor cores: Hopper's wgmma from 64-row tiles up, mma.sync for 32-row ones
        hopper = variant["constants"]["TILE"] >= 64
        assert any(op.startswith("wgmma.mma_async" if hopper else "mma.sync") and ".bf16.bf16" in op
                   for op in variant["tensor_core"]), variant
        assert "ld.global.v4.b32" in variant["loads"] and "st.global.v4.b32" in variant["stores"], variant


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["geglu", "rotary_qkv", "layer_norm", "add_layer_norm"])
def test_cuda_kernels_at_base_width_under_bf16(op):
    """ModernBERT-base widths (2 x 1152 GeGLU, 12 heads x 64, hidden 768), 3000 tokens, bf16 as
    under autocast (the norms: the fp32 residual stream, as autocast runs them; the add: a bf16
    branch output in, the norm written in bf16 for a matmul)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(3)
    if op == "geglu":
        inputs = ((3 * torch.randn(3000, 2304, generator=gen)).cuda().bfloat16().requires_grad_(),)
        grads = [torch.randn(3000, 1152, generator=gen).cuda().bfloat16()]
        fused, reference = fused_kernels.geglu, geglu_activation
    elif op == "layer_norm":
        inputs = ((3 * torch.randn(3000, 768, generator=gen) + 1).cuda().requires_grad_(),
                  (torch.rand(768, generator=gen) + 0.5).cuda())
        grads = [torch.randn(3000, 768, generator=gen).cuda()]
        fused, reference = (lambda x, w: fused_kernels.layer_norm(x, w, 1e-5)[0]), _torch_layer_norm
    elif op == "add_layer_norm":
        inputs = ((3 * torch.randn(3000, 768, generator=gen) + 1).cuda().requires_grad_(),
                  torch.randn(3000, 768, generator=gen).cuda().bfloat16(), (torch.rand(768, generator=gen) + 0.5).cuda())
        grads = [torch.randn(3000, 768, generator=gen).cuda(), torch.randn(3000, 768, generator=gen).cuda().bfloat16()]
        fused = lambda x, d, w: fused_kernels.add_layer_norm(x, d, w, 1e-5, torch.bfloat16)[:2]  # noqa: E731
        reference = lambda x, d, w: (x + d, _torch_layer_norm(x + d, w))  # noqa: E731
    else:
        qkv = torch.randn(3000, 3, 12, 64, generator=gen).cuda().bfloat16().requires_grad_()
        cos, sin = (t.cuda() for t in RotaryEmbedding(64, 160_000.0, 1024)(torch.randint(0, 1024, (3000,))))
        inputs, fused, reference = (qkv, cos, sin), fused_kernels.rotary_qkv, rotary_qkv
        grads = [torch.randn(3000, 12, 64, generator=gen).cuda().bfloat16() for _ in range(3)]
    outs = fused(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    (grad,) = torch.autograd.grad(outs, inputs[0], grads)
    first = inputs[0].detach().float().requires_grad_()
    want = reference(first, *inputs[1:])
    want = want if isinstance(want, tuple) else (want,)
    (want_grad,) = torch.autograd.grad(want, first, [g.float() for g in grads])
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got.float(), ref, rtol=2 ** -8, atol=1e-4)
    torch.testing.assert_close(grad.float(), want_grad, rtol=2 ** -8, atol=1e-4)


def test_autotune_timings_list_each_tuned_kernel_fastest_first(monkeypatch):
    """What bench_kernels.py prints after a GPU run: per tuned kernel, ms per config, fastest first
    (Triton keeps [median, p20, p80] per config); a kernel not tuned yet is left out."""
    tuned = fused_kernels._Autotuned(fused_kernels._geglu_fwd.kernel, fused_kernels._GEGLU_CONFIGS, ["n_cols"])
    untuned = fused_kernels._Autotuned(fused_kernels._geglu_bwd.kernel, fused_kernels._GEGLU_CONFIGS, ["n_cols"])
    tuned._tuned = type("Tuned", (), {"configs_timings": {"BLOCK_R: 16": [0.30, 0.29, 0.31],
                                                          "BLOCK_R: 8": [0.20, 0.19, 0.21]}})()
    monkeypatch.setattr(fused_kernels, "_AUTOTUNED", [untuned, tuned])
    timings = fused_kernels.autotune_timings()
    assert timings == {"_geglu_fwd": {"BLOCK_R: 8": 0.20, "BLOCK_R: 16": 0.30}}, timings
    assert list(timings["_geglu_fwd"]) == ["BLOCK_R: 8", "BLOCK_R: 16"]
