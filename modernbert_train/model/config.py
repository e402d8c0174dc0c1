"""ModernBERT's architecture hyper-parameters, named as in Hugging Face's `ModernBertConfig`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass
class ModernBertConfig:
    """Field names follow transformers' ModernBertConfig where the concept is the same."""

    # Which preset the recipe started from (documentation only; `preset()` applies the values).
    preset: str = "custom"
    # Padded to a multiple of 64 (ModernBERT: 50368 for its 50280-token BPE).
    vocab_size: int = 50368
    hidden_size: int = 768
    # Width of one GeGLU half: Wi projects to 2 x intermediate_size.
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    # Positions the recipe's RoPE is meant for (data.max_seq_len may not exceed it).
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    # Layers 0, n, 2n, ... attend globally; the others within a sliding window.
    global_attn_every_n_layers: int = 3
    # Window width in tokens: a token sees positions j with |i - j| <= local_attention // 2.
    local_attention: int = 128
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    embedding_dropout: float = 0.0
    mlp_dropout: float = 0.0
    # Run the MLM head only on the masked positions when labels are given.
    sparse_prediction: bool = True
    # In training, fuse the decoder projection with its cross-entropy over row chunks
    # (model/linear_cross_entropy.py): no (masked tokens x vocab) logits in memory.
    fused_head_loss: bool = True
    # GeGLU and RoPE (forward and backward) as hand-written Triton kernels (model/fused_kernels.py)
    # instead of what torch.compile generates: +5-6% tokens/s and -6 GiB at 96 x 1024 on an H200
    # (benchmarks/README.md). CUDA tensors only; CPU tensors, or no triton installed (a warning),
    # take the PyTorch definitions.
    fused_kernels: bool = True
    # The local (sliding-window) layers' attention as the Triton kernels of
    # model/window_attention.py on CUDA tensors, instead of the attention backend with a window:
    # +6.6% tokens/s at 96 x 1024 and +5.6% at 32 x 1024 on an H200, same loss (benchmarks/README.md).
    # CPU tensors take the backend; without triton, or with a head dim the kernel cannot tile
    # (power-of-two >= 16), a warning and the backend everywhere.
    window_attention_kernel: bool = True
    # With window_attention_kernel: those kernels apply RoPE to q and k as they load them, and write
    # the gradient of the Wqkv output directly (no rotated copies of q, k, v in memory, forward or
    # backward). Off until a GPU run times it against the kernels after the RoPE op.
    window_attention_rope: bool = False
    # The global layers' attention through the same kernels with no window (each token sees its
    # whole document) on CUDA tensors, instead of the attention backend (torch_varlen's
    # FlashAttention-2: ~3.8 ms per global layer forward + backward at 96 x 1024 on an H200, 8 of
    # base's 22 layers). With window_attention_rope, RoPE inside them there too. Off until a GPU
    # run times it.
    global_attention_kernel: bool = False
    # Every LayerNorm as the Triton kernels of model/fused_kernels.py on CUDA tensors (one pass per
    # row block forward and backward, the weight gradient from per-program partial sums) instead of
    # what torch.compile generates (its backward moved ~1.8 TB/s on an H200, 24.7 of 232.5 ms per
    # 96 x 1024 step). The residual add before each norm runs in the same kernel (AddNorm), and so
    # does the residual gradient's sum in its backward, as Inductor would fuse them; a norm that
    # feeds a matmul is written in the autocast dtype. Off until a GPU run times it.
    fused_layer_norm: bool = False
    # Under autocast, carry the residual stream (the running sum through the layers) in the autocast
    # dtype (bf16 under amp_bf16) instead of fp32: half the memory traffic of every LayerNorm and
    # residual add, and half the bytes they keep for backward. Off: the numerics of ModernBERT's
    # reference and of transformers (an fp32 stream, as autocast leaves it). No effect without
    # autocast. Off until a GPU run times it and a training run shows the same loss curve.
    autocast_residual: bool = False
    # sdpa | flex | flash | torch_varlen (model/attention.py); a run config may also say auto
    # (the fastest available, resolved by the trainer).
    attention_backend: str = "sdpa"
    # Special ids of the tokenizer, exported to HF config.json.
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    mask_token_id: int = 50284

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global_layer(self, layer_idx: int) -> bool:
        return layer_idx % self.global_attn_every_n_layers == 0

    def validate(self) -> None:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"model.hidden_size={self.hidden_size} is not divisible by "
                            f"num_attention_heads={self.num_attention_heads}")
        elif self.head_dim % 2:
            problems.append(f"model head_dim={self.head_dim} must be even for RoPE")
        if self.local_attention % 2 or self.local_attention <= 0:
            problems.append(f"model.local_attention={self.local_attention} must be a positive even "
                            "number (a token sees local_attention // 2 on either side)")
        if self.vocab_size % 64:
            problems.append(f"model.vocab_size={self.vocab_size} is not a multiple of 64 "
                            "(pad it up: the tokenizer's size rounded to 64)")
        if self.num_hidden_layers < 1:
            problems.append(f"model.num_hidden_layers={self.num_hidden_layers} must be >= 1")
        if self.global_attn_every_n_layers < 1:
            problems.append("model.global_attn_every_n_layers must be >= 1")
        for option in ("window_attention_rope", "global_attention_kernel"):
            if getattr(self, option) and (self.head_dim < 16 or self.head_dim & (self.head_dim - 1)):
                problems.append(f"model.{option} needs a power-of-two head dim >= 16, got "
                                f"{self.head_dim} (hidden_size / num_attention_heads)")
        if self.window_attention_rope and not self.window_attention_kernel:
            problems.append("model.window_attention_rope=true needs model.window_attention_kernel=true")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


# Fields that choose how a step is computed (kernels, loss fusion, attention backend), not what the
# weights mean: left out of an exported transformers config (model/hf_interop.py).
EXECUTION_OPTIONS = frozenset({"sparse_prediction", "fused_head_loss", "fused_kernels", "window_attention_kernel",
                               "window_attention_rope", "global_attention_kernel", "fused_layer_norm",
                               "autocast_residual", "attention_backend"})
# Those options set to what plain PyTorch runs on any machine (no triton, no GPU kernel): how a model
# is rebuilt for export, whatever the run that trained it used.
PLAIN_EXECUTION = {"attention_backend": "sdpa", "fused_kernels": False, "window_attention_kernel": False,
                   "window_attention_rope": False, "global_attention_kernel": False,
                   "fused_layer_norm": False, "autocast_residual": False}

_PRESETS = {
    "base": ModernBertConfig(preset="base"),
    "large": ModernBertConfig(preset="large", hidden_size=1024, intermediate_size=2624,
                              num_hidden_layers=28, num_attention_heads=16),
    # The embedded CPU demo: small enough to train for a few minutes on two cores.
    "tiny": ModernBertConfig(preset="tiny", vocab_size=4096, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=4, num_attention_heads=4, local_attention=32,
                             max_position_embeddings=512, global_rope_theta=10_000.0,
                             pad_token_id=3, cls_token_id=0, sep_token_id=1, mask_token_id=2),
}


def preset(name: str) -> ModernBertConfig:
    """A fresh copy of a named preset (base, large, tiny)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(_PRESETS)}")
    return replace(_PRESETS[name])
