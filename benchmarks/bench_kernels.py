"""Time the pointwise parts of a layer alone, forward and backward, at a training shape: the
PyTorch definitions eager, the same compiled by torch.compile (what a compiled step runs), and the
Triton kernels of model/fused_kernels.py; prints a table and writes JSON, with each variant's
error against an fp32 reference. `local_attention`: one local layer's sliding-window attention on
packed documents (data/synthetic.py's lognormal lengths, median 250 tokens), the fastest attention backend here
("eager") against model/window_attention.py ("triton"), with TFLOP/s of the allowed pairs;
`rotary_local_attention` the same from the Wqkv output with RoPE (the op first, or inside the kernels).
`global_attention`: one global layer on the same documents (no window), the backend against the same
kernels with no window (config global_attention_kernel). `--attention-backend` picks the backend of
the attention rows (`cudnn`: its global layer against torch_varlen's in another run).
`layer_norm`: the model's bias-free norm against fused_kernels.layer_norm; `add_layer_norm` the
residual add + norm of the layers (modernbert.AddNorm, its output rounded for the matmul after it)
against fused_kernels.AddNorm (config fused_layer_norm, off until these and bench_step's `lnk` show
it beats what torch.compile generates).
Usage: python benchmarks/bench_kernels.py --tokens 98304
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from modernbert_train.data import synthetic
from modernbert_train.model.attention import fastest_available, get_backend
from modernbert_train.model.config import preset
from modernbert_train.model.flops import window_pairs
from modernbert_train.model.modernbert import AddNorm, RotaryEmbedding, geglu_activation, rotary_qkv

VARIANTS = ("eager", "compiled", "triton")


@dataclass
class KernelResult:
    op: str
    variant: str
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    # Bytes a single fused pass must move (inputs read once, outputs written once) over the time.
    fwd_gb_s: Optional[float] = None
    bwd_gb_s: Optional[float] = None
    # Attention: FLOPs of the allowed (query, key) pairs (4 x head dim x heads per pair forward,
    # 2.5x that backward) over the time.
    fwd_tflop_s: Optional[float] = None
    bwd_tflop_s: Optional[float] = None
    max_err_out: Optional[float] = None  # vs the fp32 (fp64 on CPU) reference
    max_err_grad: Optional[float] = None
    error: Optional[str] = None


@dataclass
class OpCase:
    """One op: its PyTorch definition, its Triton kernel (None: no kernel yet), inputs, and the
    minimal bytes of its forward and backward."""
    name: str
    reference: Callable
    triton: Optional[Callable]
    inputs: Callable[[torch.dtype], tuple]  # dtype -> (differentiable input, other inputs...)
    fwd_bytes: int
    bwd_bytes: int
    fwd_flops: int = 0
    exact: Optional[Callable] = None  # the error reference where `reference` has no fp32 path


def build_cases(tokens: int, preset_name: str, dtype: torch.dtype, device: torch.device,
                attention_backend: Optional[str] = None) -> list[OpCase]:
    cfg = preset(preset_name)
    hidden, inter, heads, head_dim = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
    gen = torch.Generator(device="cpu").manual_seed(0)
    size = torch.finfo(dtype).bits // 8
    h = torch.randn(tokens, 2 * inter, generator=gen)
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=gen)
    positions = torch.randint(0, 1024, (tokens,), generator=gen)
    cos, sin = RotaryEmbedding(head_dim, cfg.global_rope_theta, 1024)(positions)
    residual = torch.randn(tokens, hidden, generator=gen)
    norm = torch.nn.LayerNorm(hidden, eps=cfg.norm_eps, bias=False).to(device)
    delta = torch.randn(tokens, hidden, generator=gen)
    add_norm = AddNorm(hidden, eps=cfg.norm_eps, bias=False).to(device)
    add_norm_exact = copy.deepcopy(add_norm).to(torch.float64 if device.type == "cpu" else torch.float32)
    kernels = _triton_ops(device)
    attention, window_kernel, exact, flops, rope = _attention(tokens, cfg, cfg.local_attention, device,
                                                              kernels.get("windowed"), kernels.get("rotary_windowed"),
                                                              attention_backend=attention_backend)
    whole = _attention(tokens, cfg, None, device, kernels.get("windowed"), attention_backend=attention_backend)
    q, k, v = (torch.randn(tokens, heads, head_dim, generator=gen) for _ in range(3))
    return [
        OpCase("geglu", geglu_activation, kernels.get("geglu"), lambda dt: (h.to(device, dt),),
               3 * tokens * inter * size, 5 * tokens * inter * size),
        OpCase("rotary_qkv", rotary_qkv, kernels.get("rotary_qkv"),
               lambda dt: (qkv.to(device, dt), cos.to(device), sin.to(device)),
               6 * tokens * hidden * size + 4 * tokens * head_dim * 4,
               6 * tokens * hidden * size + 4 * tokens * head_dim * 4),
        # The norm as the model runs it (fp32 residual in, fp32 out under autocast), against
        # model/fused_kernels.py's layer_norm (config fused_layer_norm, off by default).
        OpCase("layer_norm", norm, kernels.get("layer_norm") and _weighted(kernels["layer_norm"], norm),
               lambda dt: (residual.to(device),),
               tokens * hidden * (4 + 4), tokens * hidden * (4 + 4 + 4)),
        # The layers' residual add + norm: the fp32 stream and a branch output in the activation dtype
        # in; the new stream and the norm, rounded to that dtype as the matmul after it takes it, out.
        OpCase("add_layer_norm", _for_matmul(add_norm),
               kernels.get("add_norm") and _for_matmul(_fused_copy(kernels["add_norm"], add_norm)),
               lambda dt: (residual.to(device), delta.to(device, dt).requires_grad_()),
               tokens * hidden * (4 + size + 4 + size), tokens * hidden * (4 + size + 4 + 4 + size),
               exact=add_norm_exact),
        OpCase("local_attention", attention, window_kernel,
               lambda dt: (q.to(device, dt), k.to(device, dt).requires_grad_(), v.to(device, dt).requires_grad_()),
               4 * tokens * hidden * size, 8 * tokens * hidden * size, flops, exact),
        # RoPE + the local layer's attention from the Wqkv output: the RoPE op then the attention
        # (eager, compiled), against the window kernels rotating q and k themselves (triton;
        # config window_attention_rope). Compare with rotary_qkv + local_attention's triton rows.
        OpCase("rotary_local_attention", rope[0], rope[1],
               lambda dt: (qkv.to(device, dt), cos.to(device), sin.to(device)),
               4 * tokens * hidden * size + 2 * tokens * head_dim * 4,
               8 * tokens * hidden * size + 2 * tokens * head_dim * 4, flops, rope[2]),
        # A global layer's attention: the backend against the same kernels with no window (config
        # global_attention_kernel).
        OpCase("global_attention", whole[0], whole[1],
               lambda dt: (q.to(device, dt), k.to(device, dt).requires_grad_(), v.to(device, dt).requires_grad_()),
               4 * tokens * hidden * size, 8 * tokens * hidden * size, whole[3], whole[2]),
    ]


def _attention(tokens: int, cfg, window: Optional[int], device: torch.device, windowed: Optional[Callable],
               rotary_windowed: Optional[Callable] = None, seed: int = 0, attention_backend: Optional[str] = None):
    """Packed documents over `tokens`; attention(q, k, v) of a local layer (`window` tokens wide;
    None: a global layer) through `attention_backend` (default: the fastest here) and through model/window_attention.py
    (None without it; with no window, its whole-document mode); an exact per-document reference;
    the forward FLOPs of the allowed pairs; and the same three from the Wqkv output with RoPE:
    (the RoPE op, then the backend), (the kernels with RoPE inside), (RoPE, exact)."""
    # Enough lengths to cover `tokens` (each is >= MIN_DOC_TOKENS), the last document cut to fit.
    drawn = synthetic.document_lengths(np.random.default_rng(seed), tokens // synthetic.MIN_DOC_TOKENS + 1, 1024)
    ends = np.minimum(np.cumsum(drawn), tokens)
    ends = ends[: np.searchsorted(ends, tokens) + 1]
    lengths = np.diff(ends, prepend=0)
    cu = torch.from_numpy(np.concatenate([[0], ends])).to(torch.int32)
    half = int(lengths.max()) if window is None else window // 2
    pairs = int(window_pairs(lengths, half).sum())
    whole_document = dict(whole_document=True) if window is None else {}
    backend = get_backend(attention_backend or (fastest_available(device.type) if device.type == "cuda" else "sdpa"))
    cu_dev, max_len = cu.to(device), int(lengths.max())

    def call(fn):
        return lambda q, k, v: fn(q, k, v, cu_seqlens=cu_dev, max_seqlen=max_len, window=window, cache={})

    def exact(q, k, v):
        out = torch.empty_like(q)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            idx = torch.arange(e - s, device=q.device)
            scores = torch.einsum("ind,jnd->nij", q[s:e], k[s:e]) * q.shape[-1] ** -0.5
            scores = scores.masked_fill((idx[:, None] - idx[None, :]).abs() > half, float("-inf"))
            out[s:e] = torch.einsum("nij,jnd->ind", scores.softmax(-1), v[s:e])
        return out

    def rope_call(fn):
        return lambda qkv, cos, sin: fn(rotary_qkv, backend, qkv, (cos, sin), cu_seqlens=cu_dev,
                                        max_seqlen=max_len, window=window, cache={})

    def rope_then(attend):
        return lambda qkv, cos, sin: attend(*rotary_qkv(qkv, cos, sin))

    rope = (rope_then(call(backend)), rope_call(rotary_windowed) if rotary_windowed else None, rope_then(exact))
    return (call(backend), call(windowed(backend, **whole_document)) if windowed else None, exact,
            4 * cfg.head_dim * cfg.num_attention_heads * pairs, rope)


def _autotune_timings() -> dict[str, dict[str, float]]:
    try:
        from modernbert_train.model import fused_kernels
    except ImportError:  # no triton
        return {}
    return fused_kernels.autotune_timings()


def _interpreted(device: torch.device) -> bool:
    """On the CPU only Triton's interpreter runs the kernels (slow: tiny shapes only)."""
    return device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def _cpu_tensors_in_the_interpreter(device: torch.device):
    """The triton variants' CPU tensors go to the interpreter for this run only: the switch is
    process-wide, and a run left on would send every later CPU model in the process (tests call
    main in-process) through the interpreter."""
    if not _interpreted(device):
        yield
        return
    from modernbert_train.model import fused_kernels
    before, fused_kernels.interpret_cpu_tensors = fused_kernels.interpret_cpu_tensors, True
    try:
        yield
    finally:
        fused_kernels.interpret_cpu_tensors = before


def _weighted(layer_norm: Callable, norm: torch.nn.LayerNorm) -> Callable:
    return lambda x: layer_norm(x, norm.weight, norm.eps)[0]


def _for_matmul(add_norm: Callable) -> Callable:
    """(x, delta) -> (x + delta, the norm in delta's dtype, as the matmul after it takes it)."""
    def run(x, delta):
        s, y = add_norm(x, delta)
        return s, y.to(delta.dtype)
    return run


def _fused_copy(fused_class, add_norm: torch.nn.Module) -> torch.nn.Module:
    fused = fused_class(add_norm.normalized_shape, eps=add_norm.eps, bias=False, output_feeds_matmul=True)
    fused.load_state_dict(add_norm.state_dict())
    return fused.to(add_norm.weight.device)


def _triton_ops(device: torch.device) -> dict[str, Callable]:
    if device.type != "cuda" and not _interpreted(device):
        return {}
    from modernbert_train.model import fused_kernels, window_attention
    return {"geglu": fused_kernels.geglu, "rotary_qkv": fused_kernels.rotary_qkv, "windowed": window_attention.windowed,
            "rotary_windowed": window_attention.rotary_windowed, "layer_norm": fused_kernels.layer_norm,
            "add_norm": fused_kernels.AddNorm}


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / iters


def run_case(case: OpCase, variant: str, dtype: torch.dtype, device: torch.device, iters: int,
             autocast: bool) -> KernelResult:
    result = KernelResult(case.name, variant)
    if variant == "triton" and case.triton is None:
        result.error = "no Triton kernel (or CPU without TRITON_INTERPRET=1)"
        return result
    fn = {"eager": case.reference, "compiled": torch.compile(case.reference),
          "triton": case.triton}[variant]
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if autocast else contextlib.nullcontext
    try:
        x, *rest = case.inputs(dtype)
        x.requires_grad_()
        with ctx():
            outs = _outputs(fn(x, *rest))
        grads = [torch.randn_like(o) for o in outs]

        def forward():
            with ctx(), torch.no_grad():
                fn(x, *rest)

        def forward_backward():
            with ctx():
                torch.autograd.backward(_outputs(fn(x, *rest)), grads)

        for _ in range(2):  # compile, autotune, first launches
            forward_backward()
        result.fwd_ms = _time_ms(forward, device, iters)
        result.fwd_bwd_ms = _time_ms(forward_backward, device, iters)
        result.fwd_gb_s = case.fwd_bytes / result.fwd_ms / 1e6
        bwd_ms = result.fwd_bwd_ms - result.fwd_ms
        result.bwd_gb_s = case.bwd_bytes / bwd_ms / 1e6 if bwd_ms > 0 else None
        if case.fwd_flops:
            result.fwd_tflop_s = case.fwd_flops / result.fwd_ms / 1e9
            result.bwd_tflop_s = 2.5 * case.fwd_flops / bwd_ms / 1e9 if bwd_ms > 0 else None
        result.max_err_out, result.max_err_grad = _errors(case, fn, dtype, device, autocast, grads)
    except Exception as err:  # noqa: BLE001 - recorded per variant, the run goes on
        result.error = f"{type(err).__name__}: {err}"[:500]
    return result


def _errors(case: OpCase, fn: Callable, dtype: torch.dtype, device: torch.device, autocast: bool,
            grads: list[torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference of outputs and input gradient from the reference in high precision."""
    high = torch.float64 if device.type == "cpu" else torch.float32
    x, *rest = case.inputs(dtype)
    x.requires_grad_()
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if autocast else contextlib.nullcontext
    with ctx():
        outs = _outputs(fn(x, *rest))
    (dx,) = torch.autograd.grad(outs, x, grads)
    ref_x = x.detach().to(high).requires_grad_()
    ref_rest = [t.to(high) if t.is_floating_point() else t for t in rest]
    reference = case.reference.to(high) if isinstance(case.reference, torch.nn.Module) else case.exact or case.reference
    ref_outs = _outputs(reference(ref_x, *ref_rest))
    (ref_dx,) = torch.autograd.grad(ref_outs, ref_x, [g.to(high) for g in grads])
    if isinstance(case.reference, torch.nn.Module):
        case.reference.to(torch.float32)
    err_out = max((o.to(high) - r).abs().max().item() for o, r in zip(outs, ref_outs))
    return err_out, (dx.to(high) - ref_dx).abs().max().item()


def format_table(results: list[KernelResult]) -> str:
    header = ["op", "variant", "fwd ms", "fwd+bwd ms", "fwd GB/s", "bwd GB/s", "fwd TFLOP/s", "bwd TFLOP/s",
              "err out", "err grad"]
    rows = [header]
    for r in results:
        if r.error:
            rows.append([r.op, r.variant, f"- ({r.error})"])
            continue
        rows.append([r.op, r.variant, f"{r.fwd_ms:.3f}", f"{r.fwd_bwd_ms:.3f}", f"{r.fwd_gb_s:,.0f}",
                     "-" if r.bwd_gb_s is None else f"{r.bwd_gb_s:,.0f}",
                     "-" if r.fwd_tflop_s is None else f"{r.fwd_tflop_s:.1f}",
                     "-" if r.bwd_tflop_s is None else f"{r.bwd_tflop_s:.1f}", f"{r.max_err_out:.2e}",
                     f"{r.max_err_grad:.2e}"])
    widths = [max(len(row[i]) for row in rows if i < len(row) and len(row) > 3) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=int, default=96 * 1024, help="packed tokens (rows) per call")
    p.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="activation dtype (default bf16 on cuda, as under autocast; fp32 on cpu)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ops", nargs="+",
                   default=["geglu", "rotary_qkv", "layer_norm", "add_layer_norm", "local_attention",
                            "rotary_local_attention", "global_attention"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--attention-backend", default=None,
                   help="the attention backend of the attention ops' eager and compiled rows (default: the "
                        "fastest here; e.g. cudnn for its global layers against torch_varlen's)")
    p.add_argument("--out-json", type=Path, default=Path("bench_results/kernels.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    results = []
    with _cpu_tensors_in_the_interpreter(device):
        cases = [c for c in build_cases(args.tokens, args.preset, dtype, device, args.attention_backend)
                 if c.name in args.ops]
        for case in cases:
            for variant in args.variants:
                # the norms see fp32 activations and run under autocast, as in the model
                results.append(run_case(case, variant, dtype, device, args.iters,
                                        autocast=case.name.endswith("layer_norm") and dtype != torch.float32))
    machine = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    tuned = _autotune_timings()
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps({"machine": machine, "args": {**vars(args), "out_json": str(args.out_json)},
                                         "dtype": str(dtype), "results": [asdict(r) for r in results],
                                         "autotune_ms": tuned}, indent=2))
    print(f"{args.preset}, {args.tokens} tokens, {dtype}, {machine['gpu'] or device}")
    print(format_table(results))
    for kernel, timings in tuned.items():  # which tile / warps / stages won on this card, and by how much
        print(f"autotune {kernel}: " + ", ".join(f"{config} {ms:.3f} ms" for config, ms in timings.items()))
    return 1 if any(r.error and not r.error.startswith("no Triton kernel") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
