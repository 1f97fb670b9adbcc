"""The Llama family in one file: Llama 2/3/3.x (rope scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Read top-down: config, attention, MLP, decoder layer, the stack, the causal-LM head. Tokens of all
sequences of a step are flattened into one dimension T; the paged cache keeps them apart. The residual
stream travels beside the hidden states so each residual add fuses into the next norm on CUDA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from engine.attention import Attention, AttentionMetadata
from engine.distributed import TPInfo
from engine.errors import UnsupportedModelError
from engine.models.layers import (
    Linear,
    MergedLinear,
    QKVLinear,
    RMSNorm,
    RotaryEmbedding,
    VocabEmbedding,
    silu_and_mul,
    use_fused_kernels,
)
from engine.models.parallel_layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_head_range,
)


@dataclass(frozen=True)
class LlamaModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None or {"rope_type": "linear" | "llama3", ...}
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always, others when attention_bias
    o_bias: bool  # attention_bias (Llama, Qwen3); Qwen2 never
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None  # Mistral v0.1: we attend fully, so max_model_len must stay within it
    max_position_embeddings: int = 2048  # rows of the fused path's RoPE table (LLMEngine's default too)
    tp: TPInfo = field(default_factory=TPInfo)  # this rank's place in the tensor-parallel group (size 1: the whole model)

    def __post_init__(self) -> None:
        size = self.tp.size
        if size == 1:
            return
        problems = []
        if self.num_heads % size:
            problems.append(f"num_attention_heads={self.num_heads}")
        if self.num_kv_heads % size and size % self.num_kv_heads:
            problems.append(f"num_key_value_heads={self.num_kv_heads} (nor is it divided by it)")
        if self.intermediate_size % size:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if problems:
            raise ValueError(
                f"tensor_parallel_size={size} does not divide {', '.join(problems)}; choose a size that "
                f"divides the heads and the MLP width (the vocabulary is padded, any size works there)")

    @property
    def num_local_heads(self) -> int:
        return self.num_heads // self.tp.size

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this rank holds (and caches): its share, or one replicated head."""
        return kv_head_range(self.num_kv_heads, self.tp)[1]

    @classmethod
    def from_hf(cls, hf_config: Any, tp: TPInfo | None = None) -> LlamaModelConfig:
        """From an engine.hf_config.HFConfig (what the engine reads) or a transformers config (tests and
        tools that have one): both carry the same attribute names."""
        model_type = getattr(hf_config, "model_type", "")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf_config.hidden_act!r} is not supported (only silu)")
        # transformers >= 5 folds rope_theta and the scaling dict into rope_parameters; older versions
        # have rope_theta plus rope_scaling (with "type" or "rope_type").
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
                    or {})
        rope_theta = float(rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        num_heads = hf_config.num_attention_heads
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        sliding_window = getattr(hf_config, "sliding_window", None)
        if model_type in ("qwen2", "qwen3") and not getattr(hf_config, "use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window they do not use
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", None) or 2048,
            tp=tp or TPInfo(),
        )


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_local_heads, cfg.num_local_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.qkv_proj: QKVLinear
        self.o_proj: Linear
        if cfg.tp.size == 1:
            self.qkv_proj = QKVLinear(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                      bias=cfg.qkv_bias)
            self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        else:
            self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                              cfg.tp, bias=cfg.qkv_bias)
            self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.tp,
                                            bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary_emb = rotary_emb  # shared by every layer (one cos/sin table)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, scale=cfg.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn_metadata: AttentionMetadata
                ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 H_kv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        kv_written = False
        if self.rotary_emb.is_fused:
            # In place on the q/k views of qkv: one launch instead of ~20 small kernels. With the cache
            # bound, that launch also stores k/v in it (one launch and one read of k/v fewer a layer).
            attn = self.attn
            if attn.is_cache_bound:
                self.rotary_emb.norm_and_rotate_(positions, q, k, self.q_norm, self.k_norm, v=v,
                                                 k_cache=attn.k_cache, v_cache=attn.v_cache,
                                                 slot_mapping=attn_metadata.slot_mapping,
                                                 k_scale=attn.k_scale, v_scale=attn.v_scale)
                kv_written = True
            else:
                self.rotary_emb.norm_and_rotate_(positions, q, k, self.q_norm, self.k_norm)
        else:
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, attn_metadata, kv_written=kv_written)  # [T, H * D]
        return self.o_proj(out)  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaModelConfig) -> None:
        super().__init__()
        self.gate_up_proj: MergedLinear
        self.down_proj: Linear
        if cfg.tp.size == 1:
            self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=cfg.mlp_bias)
            self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        else:
            self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, cfg.tp,
                                                           bias=cfg.mlp_bias)
            self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.tp, bias=cfg.mlp_bias)
        self.is_fused = use_fused_kernels(self.down_proj.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        gate_up = self.gate_up_proj(x)  # [T, 2 * I]
        if self.is_fused:
            from kernels.activation import silu_and_mul as fused_silu_and_mul

            return self.down_proj(fused_silu_and_mul(gate_up))  # via [T, I]
        return self.down_proj(silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary_emb)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous layer's MLP output (or the embeddings, with residual None); residual:
        the stream before that output was added. Returns this layer's (MLP output, residual stream).

        The same sums as HF's `residual + sublayer(norm(residual))`, only each add is done by the next
        norm (fused with it on CUDA). On the CPU every add keeps HF's operands, so float32 results are
        bit-identical to adding after each sublayer."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_forward(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata)
        hidden, residual = self.post_attention_layernorm.add_forward(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaModelConfig) -> None:
        super().__init__()
        self.embed_tokens = (VocabEmbedding(cfg.vocab_size, cfg.hidden_size) if cfg.tp.size == 1
                             else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.tp))
        rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, rotary_emb) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
                ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn_metadata)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm.add_forward(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name -> (our fused parameter's module, shard id for its weight_loader).
    packed_modules_mapping: ClassVar[dict[str, tuple[str, Any]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: LlamaModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = (Linear(cfg.hidden_size, cfg.vocab_size) if cfg.tp.size == 1
                        else ParallelLMHead(cfg.hidden_size, cfg.vocab_size, cfg.tp))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf_config(cls, hf_config: Any, tp: TPInfo | None = None) -> LlamaForCausalLM:
        return cls(LlamaModelConfig.from_hf(hf_config, tp))

    @staticmethod
    def checkpoint_shapes(cfg: LlamaModelConfig) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name of a full (unsharded) checkpoint of this config, with its shape: what
        load_format="dummy" makes up."""
        h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h),
                                              "model.norm.weight": (h,)}
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, h)
        for n in range(cfg.num_layers):
            layer = f"model.layers.{n}"
            shapes |= {f"{layer}.input_layernorm.weight": (h,), f"{layer}.post_attention_layernorm.weight": (h,),
                       f"{layer}.self_attn.q_proj.weight": (q, h), f"{layer}.self_attn.k_proj.weight": (kv, h),
                       f"{layer}.self_attn.v_proj.weight": (kv, h), f"{layer}.self_attn.o_proj.weight": (h, q),
                       f"{layer}.mlp.gate_proj.weight": (i, h), f"{layer}.mlp.up_proj.weight": (i, h),
                       f"{layer}.mlp.down_proj.weight": (h, i)}
            if cfg.qkv_bias:
                shapes |= {f"{layer}.self_attn.q_proj.bias": (q,), f"{layer}.self_attn.k_proj.bias": (kv,),
                           f"{layer}.self_attn.v_proj.bias": (kv,)}
            if cfg.o_bias:
                shapes[f"{layer}.self_attn.o_proj.bias"] = (h,)
            if cfg.mlp_bias:
                shapes |= {f"{layer}.mlp.gate_proj.bias": (i,), f"{layer}.mlp.up_proj.bias": (i,),
                           f"{layer}.mlp.down_proj.bias": (h,)}
            if cfg.qk_norm:
                shapes |= {f"{layer}.self_attn.q_norm.weight": (d,), f"{layer}.self_attn.k_norm.weight": (d,)}
        return shapes

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
                ) -> torch.Tensor:  # input_ids, positions [T] -> hidden [T, hidden]
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        return self.lm_head(hidden)
