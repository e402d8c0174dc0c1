"""What torch.compile generates for one encoder layer on an H100/H200, read on a CPU-only machine:
every Triton kernel Inductor writes for the layer's forward and backward, compiled for sm_90, with
its global load/store widths and its instruction count per element. Prints a table, writes JSON.

A diagnostic, not a benchmark: nothing runs on a GPU. It traces the layer on the CPU under bf16
autocast (AOTAutograd, Inductor's decompositions and min-cut partitioner, as torch.compile does),
then has Inductor generate CUDA code for the two graphs while pretending an H100 is present
(patches of torch 2.7's CUDA queries; the kernels are captured, never launched), then compiles each
kernel in each of Inductor's autotuning configs with Triton for sm_90. The attention kernel is an
opaque placeholder (torch_varlen / flash are extern kernels in the real graph too).
Usage: python benchmarks/inductor_kernels.py [--tokens 8192] [--fused-kernels]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
import torch._inductor.config

from modernbert_train.model.config import preset
from modernbert_train.model.linear_cross_entropy import linear_cross_entropy
from modernbert_train.model.modernbert import EncoderLayer, MLMHead, RotaryEmbedding, rotary_attention

# One H100 SXM as Inductor sees it (the H200 has the same SM count and compute capability).
_Props = collections.namedtuple("_Props", "name major minor total_memory multi_processor_count "
                                "max_threads_per_multi_processor regs_per_multiprocessor warp_size "
                                "L2_cache_size max_threads_per_block shared_memory_per_block_optin "
                                "gcnArchName uuid")
H100 = _Props("NVIDIA H100 80GB HBM3", 9, 0, 80 * 2**30, 132, 2048, 65536, 32, 50 * 2**20, 1024, 232448, "", "0")
# Lane instructions per second: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz (one issue per cycle).
LANE_INSTR_PER_S = 132 * 128 * 1.98e9


@dataclass
class KernelReport:
    graph: str  # forward | backward
    name: str
    elements: int  # xnumel (x r0_numel for reductions): the elements one launch covers
    configs: int  # Inductor's autotuning configs for it
    loads: list[str]
    stores: list[str]
    instr_per_element: float  # PTX instructions per element, the best config
    est_instr_ms: float  # launches x elements x instr_per_element at LANE_INSTR_PER_S (no memory time)
    error: Optional[str] = None
    variants: list[dict] = field(default_factory=list)  # per autotuning config
    launches: int = 1  # per call of its graph (the host code runs some kernels several times)
    signature: dict = field(default_factory=dict)  # argument -> Triton type ('*bf16': a bf16 pointer)
    # output pointer -> the offsets its tl.store calls write at, as in the source ('x0': one value
    # per row; 'r0_1 + 4096*x0': a row's reduction axis too)
    store_offsets: dict = field(default_factory=dict)


@torch.library.custom_op("inductor_kernels::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.clone()  # shape stand-in: the real varlen kernel is an extern call too


@_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


_attention.register_autograd(lambda ctx, g: (g.clone(), g.clone(), g.clone()))


def _trace(step, inputs: list, params: dict) -> list[tuple[str, torch.fx.GraphModule, list]]:
    """Forward and backward graphs of step(*inputs, *params), as torch.compile partitions them
    (Inductor's decompositions, min-cut partitioner), traced on fake tensors: no math is done."""
    from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs.append((kind, gm, list(example_inputs)))
            return make_boxed_func(gm)
        return compiler

    fn = aot_function(step, fw_compiler=capture("forward"), bw_compiler=capture("backward"),
                      partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    # Dynamo reports what it traces as compiling, and the model takes its compiled form on that
    # (model/linear_cross_entropy.py); this traces without Dynamo, so it reports the same.
    with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        fn(*[make() for make in inputs], *params.values()).sum().backward()
    return graphs


def trace_layer(tokens: int, fused_kernels: bool, preset_name: str) -> list[tuple[str, torch.fx.GraphModule, list]]:
    """One local encoder layer (residual add + attention norm, Wqkv, RoPE, attention, Wo, residual
    add + MLP norm, GeGLU), bf16 autocast."""
    cfg = replace(preset(preset_name), fused_kernels=fused_kernels)
    layer = EncoderLayer(cfg, layer_idx=1)
    rotary = layer.attn.attend.args[0]  # the RoPE op of attention_op's rotary_attention
    layer.attn.attend = functools.partial(rotary_attention, rotary, lambda q, k, v, **_: _attention(q, k, v))
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.local_rope_theta, 1024)(torch.arange(tokens) % 1024)
    params = dict(layer.named_parameters())

    def step(x, delta, cos, sin, *weights):  # the stream (fp32) and the last layer's MLP output (bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x, delta = torch.func.functional_call(layer, dict(zip(params, weights)),
                                                  (x, delta, (cos, sin), None, 0, {}))
            return x.sum() + delta.sum()

    return _trace(step, [lambda: torch.empty(tokens, cfg.hidden_size, requires_grad=True),
                         lambda: torch.empty(tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True),
                         lambda: torch.empty_like(cos), lambda: torch.empty_like(sin)], params)


class _HeadAndLoss(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.head, self.decoder = MLMHead(cfg), torch.nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(self.head(x), self.decoder.weight, self.decoder.bias, target)


def trace_head(tokens: int, preset_name: str) -> list[tuple[str, torch.fx.GraphModule, list]]:
    """The MLM head on the masked positions (30% of the tokens) and the fused decoder + loss
    (model/linear_cross_entropy.py), bf16 autocast."""
    cfg = preset(preset_name)
    module = _HeadAndLoss(cfg)
    params = dict(module.named_parameters())
    masked = int(0.3 * tokens)

    def step(x, target, *weights):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.func.functional_call(module, dict(zip(params, weights)), (x, target))

    return _trace(step, [lambda: torch.empty(masked, cfg.hidden_size, requires_grad=True),
                         lambda: torch.zeros(masked, dtype=torch.long)], params)


@contextlib.contextmanager
def pretend_h100():
    """Let Inductor generate CUDA code on a machine without a GPU (torch 2.7 internals)."""
    import torch._inductor.async_compile as async_compile
    import torch._inductor.fx_passes.reinplace as reinplace
    import torch._inductor.scheduler as scheduler
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.utils._triton as torch_triton
    from torch._dynamo.device_interface import CudaInterface
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

    captured: list[tuple[str, str]] = []

    class NotLaunched:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    import torch._inductor.codecache as codecache

    load = codecache.PyCodeCache.load_by_key_path

    def load_wrapper(cls, key, path, *args, **kwargs):
        wrappers.append(Path(path).read_text())  # the host code: which kernel runs how often
        return load(key, path, *args, **kwargs)  # loading it hands each kernel to AsyncCompile.triton

    wrappers: list[str] = []
    patches = [(torch.cuda, "is_available", lambda: True), (torch.cuda, "device_count", lambda: 1),
               (torch.cuda, "current_device", lambda: 0),
               (torch.cuda, "get_device_properties", lambda *a, **k: H100),
               (torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)),
               (torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
               (torch.cuda, "set_rng_state", lambda *a, **k: None),
               (torch.cuda, "device", lambda *a, **k: contextlib.nullcontext()),
               (torch.cuda, "synchronize", lambda *a, **k: None),
               (fake_tensor, "init_gpu_context", lambda device: None),
               (scheduler, "has_triton", lambda: True), (torch_triton, "has_triton", lambda: True),
               (torch_triton, "triton_hash_with_backend", lambda: "pretend-h100"),
               (CudaInterface, "get_device_properties", staticmethod(lambda *a, **k: H100)),
               (CudaInterface.Worker, "get_device_properties", staticmethod(lambda *a, **k: H100)),
               (CudaInterface, "current_device", staticmethod(lambda: 0)),
               (CudaInterface.Worker, "current_device", staticmethod(lambda: 0)),
               (CudaInterface, "get_compute_capability", staticmethod(lambda *a, **k: 90)),
               (CudaInterface, "is_available", staticmethod(lambda: True)),
               (codecache.PyCodeCache, "load_by_key_path", classmethod(load_wrapper)),
               # A slice assignment's example value: copy_ between fake CUDA tensors reaches the
               # CUDA runtime; only the metadata matters here, which the clone already has.
               (reinplace, "_generalized_scatter", lambda inp, src, view_ops: inp.clone()),
               (async_compile.AsyncCompile, "triton",
                lambda self, name, source, device_str="cuda": captured.append((name, source)) or NotLaunched())]
    saved = [(obj, attr, obj.__dict__[attr] if attr in obj.__dict__ else getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    driver_state = dict(vars(driver))  # restored as it was: Triton 3.6's reset_active would build a CUDA driver
    driver.set_active(Driver())
    caches = torch._inductor.config.patch(force_disable_caches=True)  # generate, never reuse
    caches.__enter__()
    try:
        yield captured, wrappers
    finally:
        caches.__exit__(None, None, None)
        vars(driver).clear()
        vars(driver).update(driver_state)
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def generate_kernels(gm: torch.fx.GraphModule, example_inputs: list) -> list[tuple[str, str, int]]:
    """(name, Triton source, launches per call of the graph) of each kernel Inductor generates."""
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda = torch.device("cuda", 0)
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": cuda}
    gm.recompile()
    with pretend_h100() as (captured, wrappers):
        with FakeTensorMode():
            inputs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=cuda)
                      if isinstance(t, torch.Tensor) else t for t in example_inputs]
        try:
            compile_fx_inner(gm, inputs)
        except Exception:  # noqa: BLE001 - what follows the kernels' hand-over needs a GPU
            pass
    kernels = dict(captured)  # name -> source (a kernel may be handed over twice)
    wrapper = wrappers[-1] if wrappers else ""
    return [(name, source, max(1, len(re.findall(rf"\b{name}\.run\(", wrapper)))) for name, source in kernels.items()]


def compile_sm90(fn, signature: dict, constants: dict, attrs: dict, num_warps: int, num_stages: int = 3) -> str:
    """PTX of a @triton.jit function for sm_90 (code generation down to a cubin; no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {k: v for k, v in constants.items() if k in fn.arg_names}  # not one fixed inside the kernel
    signature = {**signature, **{name: "constexpr" for name in constants if name not in signature}}
    constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items()}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    assert compiled.asm["cubin"], "no cubin"
    return compiled.asm["ptx"]


def ptx_stats(ptx: str, num_warps: int, elements_per_program: int) -> dict:
    """Global load/store instruction kinds, and PTX instructions per element (static count: a loop
    body counts once)."""
    instructions = len([line for line in ptx.splitlines() if line.strip().endswith(";")])
    return dict(loads=sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
                stores=sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
                tensor_core=sorted(set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[.\w]*", ptx))),
                instr_per_element=instructions * num_warps * 32 / elements_per_program)


def our_kernels(tokens: int, preset_name: str) -> list[KernelReport]:
    """model/fused_kernels.py's kernels in every autotuning config, bf16 as under autocast, with the
    element counts of the Inductor kernels they replace (GeGLU: T x I forward, T x 2I backward;
    RoPE: 3 x T x hidden). Launch-time specialisation as on aligned tensors: 16-byte aligned
    pointers, token and width counts and token strides divisible by 16."""
    import triton

    from modernbert_train.model import fused_kernels

    cfg = preset(preset_name)
    inter, hidden, head_dim = cfg.intermediate_size, cfg.hidden_size, cfg.head_dim
    geglu = dict(n_rows="i32", n_cols="i32")
    cases = [("forward", fused_kernels._geglu_fwd, dict(h_ptr="*bf16", out_ptr="*bf16", **geglu), {}, 1,
              tokens * inter),
             ("backward", fused_kernels._geglu_bwd, dict(h_ptr="*bf16", grad_ptr="*bf16", dh_ptr="*bf16", **geglu),
              {}, 2, tokens * 2 * inter)]
    rotary = dict(packed_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", q_ptr="*bf16", k_ptr="*bf16",
                  v_ptr="*bf16", n_rows="i32", n_heads="i32")
    for graph, backward in (("forward", False), ("backward", True)):
        cases.append((graph, fused_kernels._rotary_qkv, rotary,
                      dict(HEAD_DIM=head_dim, HALF_BLOCK=triton.next_power_of_2(head_dim // 2), BACKWARD=backward),
                      3 * head_dim, 3 * tokens * hidden))
    # model/window_attention.py (config window_attention_kernel), one local layer: elements = the
    # output's T x hidden; the loops over key / query tiles count once (3 iterations at run time).
    # ROPE: q and k rotated as they are loaded (config window_attention_rope); "global": no window,
    # the global layers of config global_attention_kernel (the loops then run over whole documents).
    from modernbert_train.model import window_attention as window
    attention = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16")
    bounds = dict(start_ptr="*i32", end_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32")
    sizes = dict(n_tokens="i32", n_heads="i32", stride="i32", qk_scale="fp32")
    for rope, half in ((False, cfg.local_attention // 2), (True, cfg.local_attention // 2),
                       (False, window.WHOLE_DOCUMENT)):
        tile = dict(HALF=half, HEAD_DIM=head_dim, ROPE=rope)
        cases += [("forward", window._window_fwd, dict(**attention, out_ptr="*bf16", lse_ptr="*fp32", **bounds,
                                                       **sizes), tile, head_dim, tokens * hidden),
                  ("backward", window._window_bwd_dkdv,
                   dict(**attention, do_ptr="*bf16", lse_ptr="*fp32", delta_ptr="*fp32", dk_ptr="*bf16",
                        dv_ptr="*bf16", **bounds, **sizes, scale="fp32"), tile, head_dim, tokens * hidden),
                  ("backward", window._window_bwd_dq,
                   dict(**attention, do_ptr="*bf16", lse_ptr="*fp32", delta_ptr="*fp32", dq_ptr="*bf16", **bounds,
                        **sizes, scale="fp32"), tile, head_dim, tokens * hidden)]
    # The LayerNorms of config fused_layer_norm on the fp32 residual stream: a block of rows of width
    # BLOCK_C (hidden rounded up to a power of two, masked); the backward's loop over its rows counts
    # once. Alone (the embeddings', the head's) and with the residual add (ADD: a bf16 branch output
    # added, the norm written in bf16 for the matmul after it; backward: the stream's fp32 gradient
    # added, written again in bf16 for the branch).
    norm_block = triton.next_power_of_2(hidden)
    sizes = dict(n_rows="i32", n_cols="i32")
    for add in (False, True):
        low = "*bf16" if add else "*fp32"
        cases += [("forward", fused_kernels._layer_norm_fwd,
                   dict(x_ptr="*fp32", delta_ptr=low, s_ptr="*fp32", w_ptr="*fp32", y_ptr=low, mean_ptr="*fp32",
                        rstd_ptr="*fp32", **sizes, eps="fp32"),
                   dict(ADD=add, BLOCK_C=norm_block), hidden / norm_block, tokens * hidden),
                  ("backward", fused_kernels._layer_norm_bwd,
                   dict(dy_ptr=low, ds_ptr="*fp32", x_ptr="*fp32", w_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
                        dx_ptr="*fp32", ddelta_ptr=low, dw_part_ptr="*fp32", **sizes, rows_per_program="i32"),
                   dict(ADD=add, BLOCK_C=norm_block), hidden / norm_block, tokens * hidden)]
    reports = []
    for graph, kernel, signature, fixed, per_block_unit, elements in cases:
        fn = kernel.kernel
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
                 if ty.startswith("*") or name in ("n_rows", "n_cols", "stride")}
        report = KernelReport(graph, f"ours: {fn.__name__}" + (" backward" if fixed.get("BACKWARD") else "")
                              + (" rope" if fixed.get("ROPE") else "") + (" add" if fixed.get("ADD") else "")
                              + (" global" if fixed.get("HALF") == window.WHOLE_DOCUMENT else ""),
                              elements, len(kernel.configs), [], [], float("nan"), float("nan"))
        for config in kernel.configs:
            constants = {**fixed, **config.kwargs}
            rows = constants.get("BLOCK_R", constants.get("TILE"))
            block = rows * constants.get("BLOCK_C", 1) * per_block_unit
            stats = ptx_stats(compile_sm90(fn, signature, constants, attrs, config.num_warps, config.num_stages),
                              config.num_warps, block)
            report.variants.append(dict(constants=constants, num_warps=config.num_warps, num_stages=config.num_stages,
                                        **stats))
        reports.append(_summarise(report))
    return reports


def _summarise(report: KernelReport) -> KernelReport:
    """Fill the report's headline from its best compiled config (fewest instructions per element)."""
    if report.variants:
        best = min(report.variants, key=lambda v: v["instr_per_element"])
        report.loads, report.stores, report.instr_per_element = best["loads"], best["stores"], best["instr_per_element"]
        report.est_instr_ms = (report.launches * report.elements * report.instr_per_element
                               / LANE_INSTR_PER_S * 1e3)
    return report


def analyse(graph: str, name: str, source: str, launches: int, workdir: Path) -> KernelReport:
    """Compile one Inductor kernel for sm_90 in each of its autotuning configs."""
    from torch._inductor.runtime import triton_heuristics

    elements = 1
    for numel in re.findall(r"^\s+(?:x|y|r0_|r)numel = (\d+)$", source, re.M):
        elements *= int(numel)
    report = KernelReport(graph, name, elements, 0, [], [], float("nan"), float("nan"), launches=launches)
    tuned, meta = [], {}  # Inductor's configs for this kernel, its triton_meta
    # A persistent reduction fixes its reduction block (and without an x dimension, XBLOCK) inside
    # the kernel, not in its configs.
    inner_blocks = {k: int(v) for k, v in re.findall(r"(XBLOCK|R0_BLOCK|RBLOCK): tl\.constexpr = (\d+)", source)}

    def cached_autotune(size_hints, configs, triton_meta, **kwargs):
        tuned.extend(configs)
        meta.update(triton_meta)
        return lambda fn: fn

    original = triton_heuristics.cached_autotune
    triton_heuristics.cached_autotune = cached_autotune
    try:
        path = workdir / f"{name}.py"
        path.write_text(source.replace("triton_helpers.set_driver_to_gpu()", ""))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn = getattr(module, name)
    except Exception as err:  # noqa: BLE001 - recorded per kernel
        report.error = f"load: {type(err).__name__}: {err}"[:300]
        return report
    finally:
        triton_heuristics.cached_autotune = original
    report.signature = dict(meta["signature"])
    for pointer, offset in re.findall(r"tl\.store\((\w+) \+ \(([^()]*)\)", source):
        report.store_offsets.setdefault(pointer, []).append(offset)
    attrs = dict(meta["configs"][0]) if meta.get("configs") else {}
    for config in tuned:
        constants = {**meta.get("constants", {}), **config.kwargs}
        block = 1
        for key in ("XBLOCK", "YBLOCK", "R0_BLOCK", "RBLOCK"):
            block *= {**config.kwargs, **inner_blocks}.get(key, 1)
        try:
            ptx = compile_sm90(fn, meta["signature"], constants, attrs, config.num_warps)
        except Exception as err:  # noqa: BLE001 - recorded per kernel
            report.error = f"compile: {type(err).__name__}: {err}"[:300]
            continue
        report.variants.append(dict(constants=constants, num_warps=config.num_warps,
                                    **ptx_stats(ptx, config.num_warps, block)))
    report.configs = len(tuned)
    return _summarise(report)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="packed tokens of the traced chunk")
    p.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--part", choices=["layer", "head"], default="layer",
                   help="one encoder layer, or the MLM head with the fused decoder + loss")
    p.add_argument("--fused-kernels", action="store_true", help="the layer with model.fused_kernels")
    p.add_argument("--ours-only", action="store_true",
                   help="only our Triton kernels (model/fused_kernels.py, model/window_attention.py; every config), no trace")
    p.add_argument("--out-json", type=Path, default=Path("bench_results/inductor_kernels.json"))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: this compiles kernels for a real GPU target")
    reports = []
    if not args.ours_only:
        with tempfile.TemporaryDirectory() as tmp:
            traced = (trace_layer(args.tokens, args.fused_kernels, args.preset) if args.part == "layer"
                      else trace_head(args.tokens, args.preset))
            for graph, gm, inputs in traced:
                for name, source, launches in generate_kernels(gm, inputs):
                    reports.append(analyse(graph, name, source, launches, Path(tmp)))
    if args.fused_kernels or args.ours_only:
        reports += our_kernels(args.tokens, args.preset)
    header = f"{'graph':9} {'kernel':58} {'x':>2} {'elements':>11} {'instr/elem':>10} {'est ms':>7}  loads / stores"
    print(f"{args.preset} {args.part}, {args.tokens} tokens, fused_kernels={args.fused_kernels}; est ms = elements x "
          f"instr/elem at {LANE_INSTR_PER_S / 1e12:.1f}T lane-instr/s (memory time not included)")
    print(header)
    for r in reports:
        print(f"{r.graph:9} {r.name[:58]:58} {r.launches:>2} {r.elements:>11,} {r.instr_per_element:>10.1f} {r.est_instr_ms:>7.3f}  "
              f"{','.join(r.loads)} / {','.join(r.stores)}" + (f"  ERROR {r.error}" if r.error else ""))
    for graph in ("forward", "backward"):
        total = sum(r.est_instr_ms for r in reports if r.graph == graph and not r.name.startswith("ours")
                    and r.est_instr_ms == r.est_instr_ms)
        print(f"{graph}: Inductor kernels' est ms in total {total:.3f}")
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps({"args": {**vars(args), "out_json": str(args.out_json)},
                                         "torch": torch.__version__, "gpu_model": H100._asdict(),
                                         "kernels": [asdict(r) for r in reports]}, indent=2))
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
