"""Architecture hyper-parameters of a Llama-family decoder, read from GGUF metadata or config.json."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to build the network; nothing about serving.

    Weight names everywhere in prefixgate follow Hugging Face's LlamaForCausalLM naming
    (``model.layers.{i}.self_attn.q_proj.weight`` ...), whatever file format they came from.
    """

    architecture: str  # "llama" or "qwen2" (qwen2 = llama + q/k/v biases)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "GQA needs num_heads divisible by num_kv_heads"
