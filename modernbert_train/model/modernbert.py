"""ModernBERT in plain PyTorch, on the packed (unpadded) layout.

What is notable, top to bottom:
- Token embeddings -> LayerNorm (no bias) -> dropout; no position embeddings (RoPE instead).
- Pre-norm encoder layers; layer 0's attention norm is the identity (the embedding norm already
  normalised its input). Each residual add happens inside the norm after it (AddNorm: the stream
  passes between layers as x + delta), so a fused kernel reads and writes the stream once for both.
- Attention: fused Wqkv, RoPE, Wo; no biases. Layers 0, n, 2n, ... are global, the others see a
  sliding window (|i - j| <= local_attention // 2). Global and local layers use their own RoPE
  theta. The kernel is chosen by name (model/attention.py; optionally model/window_attention.py
  for the local layers, which may apply RoPE itself) when the model is built; the model never
  branches on it in forward.
- GeGLU MLP: Wi -> (input, gate), GELU(input) * gate -> Wo; no biases.
- LayerNorms without bias.
- Under autocast the residual stream stays fp32 (as in the reference), or, with
  `autocast_residual`, runs in the autocast dtype; chosen when the model is built.
- Final LayerNorm, then the MLM head: dense -> GELU -> LayerNorm -> decoder tied to the token
  embeddings; the decoder's bias is the only bias in the model. With labels, the head runs only
  on the masked positions (sparse prediction).
- Megatron-style truncated-normal init, output projections scaled down by depth.

Shape legend: T total tokens of a packed chunk, D documents, H hidden, N heads, Dh head dim,
V vocab, M masked positions, B x S a padded batch.
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from modernbert_train.model.attention import get_backend, prepare_attention, token_document_ids
from modernbert_train.model.config import ModernBertConfig
from modernbert_train.model.linear_cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """(T,) position of each token inside its document, restarting at 0 per document."""
    doc = token_document_ids(cu_seqlens, total_tokens)
    return torch.arange(total_tokens, device=cu_seqlens.device) - cu_seqlens[doc].long()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The loss is computed in fp32 (or fp64 for an fp64 model), never in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled rows; 0, not NaN, when there are none (as the fused
    loss): a chunk without a masked token must not stop a run at its NaN guard or poison an eval mean."""
    total = F.cross_entropy(_at_least_fp32(logits), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


# --- RoPE ------------------------------------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    """cos/sin for one theta, looked up by position id in tables computed once.

    A table lookup, not cos/sin of position x frequency in the step: compiled, the latter is fused
    into every RoPE kernel and recomputed per head, which made those kernels compute-bound (~9% of
    an H200 step at 96 x 1024, benchmarks/README.md)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_positions, Dh)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_table[position_ids], self.sin_table[position_ids]  # (T, Dh) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, N, Dh); rotate-half convention (as transformers' ModernBERT)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos[:, None, :] + rotated.float() * sin[:, None, :]).to(x.dtype)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (T, 3, N, Dh) -> q and k with RoPE applied, v: (T, N, Dh) each."""
    q, k, v = qkv.unbind(dim=1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def geglu_activation(h: torch.Tensor) -> torch.Tensor:
    """h (T, 2I) -> GELU(input) * gate (T, I), exact (erf) GELU."""
    inp, gate = h.chunk(2, dim=-1)
    return F.gelu(inp) * gate


def pointwise_ops(config: ModernBertConfig):
    """(rotary_qkv, geglu_activation): the PyTorch definitions above, or with `fused_kernels` the
    Triton kernels of model/fused_kernels.py (same signatures; CPU tensors go straight to the
    definitions above). Without triton (e.g. torch's CPU-only wheels) a warning and the definitions."""
    if not config.fused_kernels:
        return rotary_qkv, geglu_activation
    try:
        fused_kernels = importlib.import_module("modernbert_train.model.fused_kernels")
    except ImportError as err:
        warnings.warn(f"model.fused_kernels: triton is not importable ({err}), so GeGLU and RoPE run "
                      "as PyTorch ops (slower on a GPU: triton comes with torch's CUDA wheels); set "
                      "model.fused_kernels=false to silence this", stacklevel=2)
        return rotary_qkv, geglu_activation
    return fused_kernels.rotary_qkv, fused_kernels.geglu


def _window_kernels(config: ModernBertConfig, is_global: bool):
    """model/window_attention.py for a layer, or None where it cannot run: no triton, or a head dim
    its tiles do not take (power-of-two >= 16). On by default for the local layers like
    fused_kernels, so then a warning names the fix and the attention backend runs;
    `window_attention_rope` and `global_attention_kernel` are explicit opt-ins, so then an error."""
    head_dim = config.head_dim
    if head_dim < 16 or head_dim & (head_dim - 1):
        why, error = f"tiles power-of-two head dims >= 16, not {head_dim}", ValueError
    else:
        try:
            return importlib.import_module("modernbert_train.model.window_attention")
        except ImportError as err:
            why, error = f"needs triton ({err}; it comes with torch's CUDA wheels)", ImportError
    for option in ("global_attention_kernel",) if is_global else ("window_attention_rope",):
        if getattr(config, option):
            raise error(f"model.{option}=true: the window attention kernel {why}; set model.{option}=false")
    warnings.warn(f"model.window_attention_kernel: the window attention kernel {why}, so the local layers "
                  "use the attention backend; set model.window_attention_kernel=false to silence this",
                  stacklevel=3)
    return None


def attention_op(config: ModernBertConfig, is_global: bool):
    """RoPE, then attention, as one function: (qkv (T, 3, N, Dh), (cos, sin), *, cu_seqlens,
    max_seqlen, window, cache) -> (T, N, Dh). The attention backend by name (model/attention.py)
    after the RoPE op; with `window_attention_kernel` the local layers wrap the backend in
    model/window_attention.py's kernels (used on CUDA tensors), and with `window_attention_rope`
    too those kernels rotate q and k themselves; `global_attention_kernel` does the same for the
    global layers (the kernels with no window)."""
    backend = get_backend(config.attention_backend)
    rotary = pointwise_ops(config)[0]
    wanted = config.global_attention_kernel if is_global else config.window_attention_kernel
    kernels = _window_kernels(config, is_global) if wanted else None
    if kernels is not None:
        if config.window_attention_rope:
            return functools.partial(kernels.rotary_windowed, rotary, backend, whole_document=is_global)
        backend = kernels.windowed(backend, whole_document=is_global)
    return functools.partial(rotary_attention, rotary, backend)


def rotary_attention(rotary, attend, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     **kwargs) -> torch.Tensor:
    q, k, v = rotary(qkv, *rope)  # (T, N, Dh) each
    return attend(q, k, v, **kwargs)


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype of its device while autocast is on there; x itself otherwise."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def residual_cast(config: ModernBertConfig):
    """What the embeddings' output passes through before the layers: with `autocast_residual` the
    cast above (the sums x + attn(...) and x + mlp(...) then stay in that dtype, since both branches
    end in an autocast matmul), else nothing, and autocast's fp32 LayerNorm output keeps the stream
    in fp32."""
    return to_autocast_dtype if config.autocast_residual else _unchanged


# --- blocks ----------------------------------------------------------------------------------------

class AddNorm(nn.LayerNorm):
    """The residual add and the pre-norm after it: (x, delta) -> (x + delta, norm(x + delta)).
    Bias-free. One module so that fused_kernels.AddNorm (config fused_layer_norm) can do both in
    one pass over the stream."""

    def forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + delta
        return x, super().forward(x)


def _fused_norms(config: ModernBertConfig):
    """model/fused_kernels.py when `fused_layer_norm` asks for it (an explicit opt-in, so a missing
    triton is an error), else None."""
    if not config.fused_layer_norm:
        return None
    try:
        return importlib.import_module("modernbert_train.model.fused_kernels")
    except ImportError as err:
        raise ImportError(f"model.fused_layer_norm=true needs triton ({err}; it comes with torch's CUDA wheels); "
                          "set model.fused_layer_norm=false") from err


def layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    """A norm with no residual add before it (embeddings, MLM head): bias-free; with
    `fused_layer_norm` fused_kernels.LayerNorm (same parameters, Triton kernels on CUDA tensors)."""
    fused = _fused_norms(config)
    module = fused.LayerNorm if fused else nn.LayerNorm
    return module(config.hidden_size, eps=config.norm_eps, bias=False)


def add_norm(config: ModernBertConfig, output_feeds_matmul: bool) -> AddNorm:
    """A residual add + norm; with `fused_layer_norm` fused_kernels.AddNorm, which under autocast
    writes the norm in the autocast dtype where `output_feeds_matmul` (the matmul would round it
    to that dtype anyway)."""
    fused = _fused_norms(config)
    if fused is None:
        return AddNorm(config.hidden_size, eps=config.norm_eps, bias=False)
    return fused.AddNorm(config.hidden_size, eps=config.norm_eps, bias=False, output_feeds_matmul=output_feeds_matmul)


class Embeddings(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = layer_norm(config)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class Attention(nn.Module):
    def __init__(self, config: ModernBertConfig, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.is_global = config.is_global_layer(layer_idx)
        self.window = None if self.is_global else config.local_attention
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.attend = attention_op(config, self.is_global)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor,
                max_seqlen: int, cache: dict) -> torch.Tensor:
        total = x.shape[0]
        qkv = self.Wqkv(x).view(total, 3, self.num_heads, self.head_dim)  # (T, 3, N, Dh)
        out = self.attend(qkv, rope, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=self.window,
                          cache=cache)  # (T, N, Dh)
        return self.Wo(out.reshape(total, self.num_heads * self.head_dim))  # (T, H)


class GeGLU(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.act = pointwise_ops(config)[1]
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Wo(self.drop(self.act(self.Wi(x))))  # Wi: (T, 2I), act: (T, I)


class EncoderLayer(nn.Module):
    """Pre-norm. The stream arrives as (x, delta), delta the previous layer's MLP output (None for
    layer 0), which attn_norm adds; the layer returns its own MLP output unadded in the same way."""

    def __init__(self, config: ModernBertConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.Identity() if layer_idx == 0 else add_norm(config, output_feeds_matmul=True)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = add_norm(config, output_feeds_matmul=True)
        self.mlp = GeGLU(config)

    def forward(self, x, delta, rope, cu_seqlens, max_seqlen, cache):
        x, h = (x, self.attn_norm(x)) if delta is None else self.attn_norm(x, delta)
        x, h = self.mlp_norm(x, self.attn(h, rope, cu_seqlens, max_seqlen, cache))
        return x, self.mlp(h)


class ModernBertModel(nn.Module):
    """The encoder: packed tokens in, final hidden states out."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = add_norm(config, output_feeds_matmul=False)  # the model's output
        self.global_rope = RotaryEmbedding(config.head_dim, config.global_rope_theta,
                                           config.max_position_embeddings)
        self.local_rope = RotaryEmbedding(config.head_dim, config.local_rope_theta,
                                          config.max_position_embeddings)
        self.residual_cast = residual_cast(config)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (T,), cu_seqlens (D+1,) int32 -> hidden states (T, H)."""
        total = input_ids.shape[0]
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, total)
        global_rope, local_rope = self.global_rope(position_ids), self.local_rope(position_ids)
        # Per-forward attention structures (block masks) built once, before any layer.
        cache = prepare_attention(self.config.attention_backend, cu_seqlens, total,
                                  {layer.attn.window for layer in self.layers},
                                  bounds=self.config.window_attention_kernel or self.config.global_attention_kernel)
        x, delta = self.residual_cast(self.embeddings(input_ids)), None  # the stream: x + delta, (T, H)
        for layer in self.layers:
            rope = global_rope if layer.attn.is_global else local_rope
            x, delta = layer(x, delta, rope, cu_seqlens, max_seqlen, cache)
        return self.final_norm(x, delta)[1]


class MLMHead(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.act = nn.GELU()
        self.norm = layer_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


@dataclass
class MLMOutput:
    # Sparse prediction with labels: (M, V) at `masked_positions`; otherwise (T, V) packed or
    # (B, S, V) when the input was padded. None when training with the fused head loss.
    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None
    # Number of positions the loss averages over.
    num_predictions: Optional[torch.Tensor] = None
    masked_positions: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None


class ModernBertForMaskedLM(nn.Module):
    """Encoder + MLM head. Takes packed input (input_ids (T,) + cu_seqlens) or padded input
    (input_ids (B, S) + attention_mask), unpadded once here and re-padded once at the end."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = MLMHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight  # tied
        self.reset_parameters()

    @staticmethod
    def prediction_positions(labels: torch.Tensor, slots: Optional[int]) -> torch.Tensor:
        """(M,) positions the sparse head runs on: exactly the labelled ones, or, given `slots` (an
        upper bound on their count that the data pipeline guarantees), the labelled ones first and
        then unlabelled filler up to `slots`, so the shape is fixed and no host sync is needed."""
        labelled = labels != IGNORE_INDEX
        if slots is None:
            return labelled.nonzero().squeeze(-1)
        if slots > labels.numel():
            raise ValueError(f"prediction_slots={slots} exceeds the {labels.numel()} tokens of the chunk")
        order = torch.argsort(labelled.to(torch.uint8), descending=True, stable=True)
        return order[:slots]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal (cut at +-cutoff std); output projections std / sqrt(2 * layers)."""
        cfg = self.config
        std_in = cfg.initializer_range
        std_out = cfg.initializer_range / math.sqrt(2.0 * cfg.num_hidden_layers)

        def init(weight: torch.Tensor, std: float) -> None:
            cut = cfg.initializer_cutoff_factor * std
            nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-cut, b=cut)

        init(self.model.embeddings.tok_embeddings.weight, std_in)
        for layer in self.model.layers:
            init(layer.attn.Wqkv.weight, std_in)
            init(layer.attn.Wo.weight, std_out)
            init(layer.mlp.Wi.weight, std_in)
            init(layer.mlp.Wo.weight, std_out)
        init(self.head.dense.weight, std_out)
        nn.init.zeros_(self.decoder.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                prediction_slots: Optional[int] = None) -> MLMOutput:
        padded_shape = None
        if input_ids.dim() == 2:  # (B, S) + attention_mask: unpad once, here
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            padded_shape = input_ids.shape
            keep = attention_mask.flatten().nonzero().squeeze(-1)  # (T,)
            lengths = attention_mask.sum(dim=1, dtype=torch.int32)  # (B,)
            cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            max_seqlen = int(lengths.max())
            input_ids = input_ids.flatten()[keep]
            labels = labels.flatten()[keep] if labels is not None else None
            position_ids = None
        elif cu_seqlens is None:
            raise ValueError("packed input_ids (T,) need cu_seqlens; padded input is (B, S)")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_seqlen > self.config.max_position_embeddings:  # the RoPE tables end there
            raise ValueError(f"documents of up to {max_seqlen} tokens, but the model's RoPE covers "
                             f"max_position_embeddings={self.config.max_position_embeddings}")

        hidden = self.model(input_ids, cu_seqlens, max_seqlen, position_ids)  # (T, H)

        if labels is not None and self.config.sparse_prediction:
            masked = self.prediction_positions(labels, prediction_slots)  # (M,)
            target = labels[masked]  # IGNORE_INDEX in unused slots
            num_predictions = (target != IGNORE_INDEX).sum()
            head_out = self.head(hidden[masked])  # (M, H)
            if self.training and torch.is_grad_enabled() and self.config.fused_head_loss:
                # No (M, V) logits in training (model/linear_cross_entropy.py); nothing reads them.
                loss = linear_cross_entropy(head_out, self.decoder.weight, self.decoder.bias, target,
                                            ignore_index=IGNORE_INDEX)
                return MLMOutput(None, loss, num_predictions, masked, target)
            logits = self.decoder(head_out)  # (M, V)
            loss = masked_cross_entropy(logits, target)
            return MLMOutput(logits, loss, num_predictions, masked, target)

        logits = self.decoder(self.head(hidden))  # (T, V)
        loss = num = None
        if labels is not None:
            loss = masked_cross_entropy(logits, labels)
            num = (labels != IGNORE_INDEX).sum()
        if padded_shape is not None:  # re-pad once, at the end
            full = logits.new_zeros(padded_shape.numel(), logits.shape[-1])
            full[keep] = logits
            logits = full.view(*padded_shape, -1)  # (B, S, V)
        return MLMOutput(logits, loss, num, None, labels)
