"""Attention backends behind one seam: packed q/k/v + document boundaries + optional window.

Every backend computes the same thing. For packed tokens laid out as documents back to back
(boundaries in `cu_seqlens`), token i attends to token j iff both lie in the same document and,
when `window` is set, |i - j| <= window // 2 (inclusive; ModernBERT's 128-token window sees 64 on
either side). No token attends across a document boundary. Shapes: q, k, v and the output are
(total_tokens, heads, head_dim).

`cache` is a dict that lives for one forward pass: a backend may keep per-batch structures there
(the FlexAttention block masks) so that 22 layers share one build. `prepare_attention` fills it
before the first layer runs, outside any compiled layer; a backend called on an empty cache builds
what it needs itself.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def token_document_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """(total_tokens,) index of the document each token belongs to (empty documents own no token).

    Searches the whole of `cu_seqlens` (the count of offsets <= each position, minus one) rather
    than its slice `cu_seqlens[1:]`: Inductor's searchsorted lowering drops a slice's storage
    offset on CUDA (pytorch/pytorch#182343), so the compiled slice form gave every token the next
    document's index: the window kernel's bounds then excluded every key (NaN loss on an H200,
    torch 2.11) and positions came out negative."""
    positions = torch.arange(total_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, positions, right=True) - 1


def document_bounds(cu_seqlens: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_tokens,) int32 start and end (exclusive) of each token's document."""
    doc = token_document_ids(cu_seqlens, total_tokens)
    cu = cu_seqlens.to(torch.int32)
    return cu[doc].contiguous(), cu[torch.clamp(doc + 1, max=cu.numel() - 1)].contiguous()


def _window_half(window: Optional[int]) -> Optional[int]:
    return None if window is None else window // 2


# --- sdpa: the reference -------------------------------------------------------------------------

def dense_allowed_mask(cu_seqlens: torch.Tensor, total_tokens: int,
                       window: Optional[int]) -> torch.Tensor:
    """(T, T) bool: the definition of who may attend to whom, materialised. Reference only."""
    doc = token_document_ids(cu_seqlens, total_tokens)
    allowed = doc[:, None] == doc[None, :]
    half = _window_half(window)
    if half is not None:
        idx = torch.arange(total_tokens, device=cu_seqlens.device)
        allowed &= (idx[:, None] - idx[None, :]).abs() <= half
    return allowed


def _row_starts(cu_seqlens: torch.Tensor, total: int) -> tuple[list[int], int]:
    """First token of each row of the padded batch, and the row length L (the longest document):
    consecutive documents share a row while they fit (next fit; empty documents own no token)."""
    bounds = cu_seqlens.tolist()
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but there are {total} tokens: the documents "
                         "must cover the packed tokens")
    longest = max(end - start for start, end in zip(bounds, bounds[1:]))
    row_starts = []
    for start, end in zip(bounds, bounds[1:]):
        if end > start and (not row_starts or end - row_starts[-1] > longest):
            row_starts.append(start)
    return row_starts, longest


def _padded_layout(cu_seqlens: torch.Tensor, total: int, window: Optional[int], row_starts: list[int],
                   longest: int):
    """The packed tokens as a padded (R, L) batch: gather indices into them (R * L,), each token's
    slot in the batch (T,), and the (R, 1, L, L) mask: same document (and the window); padding
    slots attend to their row's tokens, so that no query row is fully masked."""
    device = cu_seqlens.device
    starts = torch.tensor(row_starts, device=device)
    lengths = torch.diff(starts, append=starts.new_tensor([total]))
    offsets = torch.arange(longest, device=device)
    valid = offsets[None, :] < lengths[:, None]  # (R, L)
    index = (starts[:, None] + offsets[None, :]).clamp(max=total - 1)  # (R, L)
    # Rows hold consecutive tokens from token 0, so the valid slots in row-major order are tokens 0..T-1.
    slots = valid.flatten().nonzero().squeeze(-1)
    doc = token_document_ids(cu_seqlens, total)[index]  # (R, L)
    allowed = doc[:, :, None] == doc[:, None, :]  # (R, L, L)
    half = _window_half(window)
    if half is not None:
        allowed &= (offsets[:, None] - offsets[None, :]).abs() <= half
    allowed = (allowed | ~valid[:, :, None]) & valid[:, None, :]
    return index.flatten(), slots, allowed[:, None]


def _sdpa_prepare(cache: dict, cu_seqlens: torch.Tensor, total: int, window: Optional[int]) -> None:
    row_starts, longest = _row_starts(cu_seqlens, total)
    if len(row_starts) * longest * longest < total * total:
        cache[("sdpa", window)] = ("padded", _padded_layout(cu_seqlens, total, window, row_starts, longest))
    else:
        cache[("sdpa", window)] = ("dense", dense_allowed_mask(cu_seqlens, total, window))


def sdpa_attention(q, k, v, *, cu_seqlens, max_seqlen, window, cache, scale=None):
    """Reference backend (CPU, small chunks): SDPA over the documents gathered into a padded
    (R, L) batch, or over the whole chunk with a dense (T, T) mask when that is cheaper."""
    if ("sdpa", window) not in cache:
        _sdpa_prepare(cache, cu_seqlens, q.shape[0], window)
    kind, layout = cache[("sdpa", window)]
    if kind == "dense":  # (T, H, D) -> (1, H, T, D)
        out = F.scaled_dot_product_attention(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)),
                                             attn_mask=layout, scale=scale)
        return out.squeeze(0).transpose(0, 1)
    index, slots, allowed = layout
    rows, longest = allowed.shape[0], allowed.shape[-1]
    # index_select both ways: its backward adds rows into place, where advanced indexing's is an
    # accumulating index_put (on the CPU ~10% of a tiny-model step).
    qp, kp, vp = (x.index_select(0, index).view(rows, longest, *x.shape[1:]).transpose(1, 2)
                  for x in (q, k, v))  # (R, L, H, Dh) -> (R, H, L, Dh)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=allowed, scale=scale)
    return out.transpose(1, 2).reshape(rows * longest, *q.shape[1:]).index_select(0, slots)  # (T, H, Dh)


# --- flex: FlexAttention with a block mask built at block level -------------------------------------

FLEX_BLOCK_SIZE = 128


def flex_block_mask(cu_seqlens: torch.Tensor, total_tokens: int, window: Optional[int],
                    block_size: int = FLEX_BLOCK_SIZE):
    """A FlexAttention BlockMask for documents AND window, without a dense (T, T) intermediate.

    Block-level structure comes from each block's first/last document and token index, so the
    cost is (T / block)^2, not T^2; the exact token-level rule is the mask_mod applied inside the
    blocks marked partial.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    doc = token_document_ids(cu_seqlens, total_tokens)
    half = _window_half(window)
    n_blocks = -(-total_tokens // block_size)
    starts = torch.arange(n_blocks, device=device) * block_size
    ends = torch.clamp(starts + block_size, max=total_tokens) - 1  # inclusive last token
    doc_lo, doc_hi = doc[starts], doc[ends]
    # Documents are contiguous, so two blocks share a document iff their ranges overlap.
    share = (doc_lo[:, None] <= doc_hi[None, :]) & (doc_lo[None, :] <= doc_hi[:, None])
    single = (doc_lo == doc_hi)
    same_single = single[:, None] & single[None, :] & (doc_lo[:, None] == doc_lo[None, :])
    if half is None:
        any_ok, all_ok = share, same_single
    else:
        gap = torch.clamp(torch.maximum(starts[None, :] - ends[:, None], starts[:, None] - ends[None, :]),
                          min=0)
        span = torch.maximum(ends[None, :] - starts[:, None], ends[:, None] - starts[None, :])
        any_ok, all_ok = share & (gap <= half), same_single & (span <= half)
    partial = any_ok & ~all_ok

    def to_indices(blocks: torch.Tensor):
        counts = blocks.sum(-1, dtype=torch.int32)
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = doc[q_idx] == doc[kv_idx]
        if half is not None:
            ok = ok & ((q_idx - kv_idx).abs() <= half)
        return ok

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(all_ok)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(total_tokens, total_tokens))


_compiled_flex = None


def _flex_kernel(on_cuda: bool):
    """Compiled on the GPU (eager FlexAttention is a slow reference there); eager on the CPU,
    where torch 2.7 cannot build the compiled kernel."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if not on_cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _flex_prepare(cache: dict, cu_seqlens: torch.Tensor, total: int, window: Optional[int]) -> None:
    # The kernel works on whole blocks: a ragged tail is padded and becomes one more document,
    # so no real token ever sees it.
    pad = (-total) % FLEX_BLOCK_SIZE
    cu = torch.cat([cu_seqlens, cu_seqlens.new_tensor([total + pad])]) if pad else cu_seqlens
    cache[("flex_mask", window)] = flex_block_mask(cu, total + pad, window)


def flex_attention_backend(q, k, v, *, cu_seqlens, max_seqlen, window, cache, scale=None):
    total = q.shape[0]
    pad = (-total) % FLEX_BLOCK_SIZE
    if ("flex_mask", window) not in cache:
        _flex_prepare(cache, cu_seqlens, total, window)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, T, D)
    if pad:  # the padded rows are dropped below
        qh, kh, vh = (F.pad(x, (0, 0, 0, pad)) for x in (qh, kh, vh))
    out = _flex_kernel(q.is_cuda)(qh, kh, vh, block_mask=cache[("flex_mask", window)], scale=scale)
    return out[0, :, :total].transpose(0, 1)


# --- flash: flash-attn varlen (FA3 interface when present) ----------------------------------------

def _flash_varlen():
    if importlib.util.find_spec("flash_attn_interface") is not None:  # FlashAttention-3 (Hopper)
        from flash_attn_interface import flash_attn_varlen_func
        return flash_attn_varlen_func
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func


def _as_half(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)


def flash_attention_backend(q, k, v, *, cu_seqlens, max_seqlen, window, cache, scale=None):
    half = _window_half(window)
    out = _flash_varlen()(_as_half(q), _as_half(k), _as_half(v), cu_seqlens, cu_seqlens,
                          max_seqlen, max_seqlen, softmax_scale=scale, causal=False,
                          window_size=(-1, -1) if half is None else (half, half))
    out = out[0] if isinstance(out, tuple) else out
    return out.to(q.dtype)


# --- torch_varlen: torch.nn.attention.varlen.varlen_attn (torch >= 2.10) ---------------------------

def torch_varlen_backend(q, k, v, *, cu_seqlens, max_seqlen, window, cache, scale=None):
    from torch.nn.attention.varlen import varlen_attn
    half = _window_half(window)
    out = varlen_attn(_as_half(q), _as_half(k), _as_half(v), cu_seqlens, cu_seqlens, max_seqlen,
                      max_seqlen, scale=scale, window_size=(-1, -1) if half is None else (half, half))
    return out.to(q.dtype)


# --- cudnn: cuDNN's fused attention on the documents (torch >= 2.11, cuDNN >= 9.18, sm90 / sm100) ------

def cudnn_attention_backend(q, k, v, *, cu_seqlens, max_seqlen, window, cache, scale=None):
    """Global layers through cuDNN (model/cudnn_attention.py); windowed layers, and chunks whose
    documents are all <= 128 tokens (torch keeps those off cuDNN's ragged path), through varlen_attn."""
    from modernbert_train.model.cudnn_attention import MIN_MAX_SEQLEN, cudnn_attention
    if window is not None or max_seqlen < MIN_MAX_SEQLEN:
        return torch_varlen_backend(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window,
                                    cache=cache, scale=scale)
    out, _ = cudnn_attention(_as_half(q), _as_half(k), _as_half(v), cu_seqlens.to(torch.int32), max_seqlen,
                             q.shape[-1] ** -0.5 if scale is None else scale)
    return out.to(q.dtype)


# --- the table -------------------------------------------------------------------------------------

def _flex_missing() -> Optional[str]:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no FlexAttention: install torch>=2.5"
    return None


@functools.cache
def flex_cpu_training_missing() -> Optional[str]:
    """None if this torch's FlexAttention can train on CPU tensors, else why not and the fix. Torch
    2.7 runs its eager reference there; since torch 2.10 CPU inputs that require grad are refused
    (pytorch/pytorch#169646), compiled or not. Probed once, with a 16-token call, outside any
    compiled region (the run's assembly and the tests ask)."""
    reason = _flex_missing()
    if reason is not None:
        return reason
    from torch.nn.attention.flex_attention import flex_attention
    x = torch.zeros(1, 1, 16, 8, requires_grad=True)
    try:
        flex_attention(x, x, x).sum().backward()
    except NotImplementedError:
        return (f"torch {torch.__version__}'s FlexAttention has no CPU backward (none since torch 2.10); "
                "on the CPU use attention_backend: sdpa (or auto)")
    return None


def _flash_missing() -> Optional[str]:
    if importlib.util.find_spec("flash_attn_interface") is None and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed: pip install 'modernbert-train[gpu]' (needs CUDA), or use attention_backend=flex"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA GPU; on the CPU use attention_backend=sdpa"
    return None


def _torch_varlen_missing() -> Optional[str]:
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return (f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch>=2.10); "
                "use attention_backend=flex or flash")
    if not torch.cuda.is_available():
        return "torch_varlen needs a CUDA GPU; on the CPU use attention_backend=sdpa"
    return None


def _cudnn_missing() -> Optional[str]:
    from modernbert_train.model.cudnn_attention import unavailable_reason as cudnn_reason
    return cudnn_reason() or _torch_varlen_missing()  # the latter: for the windowed layers


BACKENDS: dict[str, tuple[AttentionFn, Callable[[], Optional[str]]]] = {
    "sdpa": (sdpa_attention, lambda: None),
    "flex": (flex_attention_backend, _flex_missing),
    "flash": (flash_attention_backend, _flash_missing),
    "torch_varlen": (torch_varlen_backend, _torch_varlen_missing),
    # Not in `auto` until a GPU run has timed it against torch_varlen (benchmarks/gpu_check.sh).
    "cudnn": (cudnn_attention_backend, _cudnn_missing),
}
# Per-forward structures built once for all layers (the varlen kernels need none).
_PREPARE: dict[str, Callable[[dict, torch.Tensor, int, Optional[int]], None]] = {
    "sdpa": _sdpa_prepare,
    "flex": _flex_prepare,
}


def prepare_attention(name: str, cu_seqlens: torch.Tensor, total_tokens: int,
                      windows: set[Optional[int]], bounds: bool = False) -> dict:
    """The per-forward `cache` for backend `name`, filled for each window the layers use; with
    `bounds`, also each token's document start and end (model/window_attention.py reads them)."""
    cache: dict = {}
    if name in _PREPARE:
        for window in windows:
            _PREPARE[name](cache, cu_seqlens, total_tokens, window)
    if bounds:
        cache["document_bounds"] = document_bounds(cu_seqlens, total_tokens)
    return cache


# Fastest first, as measured on an H200 with torch 2.11 (benchmarks/README.md): varlen_attn 335k
# tokens/s, FlexAttention 308k; flash-attn was not installable there (unmeasured, same kernel family).
_FASTEST_ON_CUDA = ("torch_varlen", "flash", "flex")


def fastest_available(device_type: str) -> str:
    """The backend `attention_backend: auto` resolves to: the fastest that runs here."""
    if device_type == "cuda":
        for name in _FASTEST_ON_CUDA:
            if unavailable_reason(name) is None:
                return name
    return "sdpa"


def unavailable_reason(name: str) -> Optional[str]:
    """None if the backend can run here, else why not and how to fix it."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}"
    return BACKENDS[name][1]()


def get_backend(name: str) -> AttentionFn:
    """The backend's function, or one ValueError that names the fix."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} is not available: {reason}")
    return BACKENDS[name][0]
