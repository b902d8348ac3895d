"""A tiny Qwen2 checkpoint built in a test (no model hub is reachable): Qwen2.5's real chat template with
tools, a byte-level BPE ``tokenizer.json`` trained here with the ``tokenizers`` library (Qwen2's
pre-tokenizer, its added tokens ``<|im_start|>``, ``<tool_call>``, ...), and safetensors weights.

The weights are small random numbers with one behaviour planted, so a real engine serving the checkpoint
greedily *calls a tool* and then *answers from the tool's result*: one decoder layer whose embeddings,
attention and LM head are set by hand.
- The residual stream holds the current token in its own dimension (``newline``, ``<tool_call>``, the
  call's JSON, ``</tool_call>``, ``Sunny``, ``<tool_response>``); the MLP adds nothing.
- One attention head looks for ``<tool_response>`` anywhere earlier in the sequence, by content: a
  constant query (the q bias, Qwen2's) against a key only that token has, in the lowest-frequency RoPE
  pair (so position barely rotates it). Its value writes a "tool answered" flag.
- The LM head is a bigram table on the current token, plus the flag: after the generation prompt's
  newline the model says ``<tool_call>`` ``{"name": "get_weather", ...}`` ``</tool_call>`` ``<|im_end|>``
  unless a tool has answered, then ``Sunny`` ``<|im_end|>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CHAT_TEMPLATE = (Path(__file__).parent / "data" / "qwen2_5_chat_template.jinja").read_text(encoding="utf-8")
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]  # Qwen2.5: not special

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name."}},
            "required": ["city"],
        },
    },
}
# The same tool as the Responses API and Anthropic's Messages API spell it.
RESPONSES_WEATHER_TOOL = {"type": "function", **WEATHER_TOOL["function"]}
ANTHROPIC_WEATHER_TOOL = {
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
CALL_ARGUMENTS = {"city": "Paris"}
CALL_TEXT = json.dumps({"name": "get_weather", "arguments": CALL_ARGUMENTS})  # one token of its own
ANSWER = "Sunny"

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 4, 2, 16, 128
ROPE_SLOW = HEAD_DIM // 2 - 1  # the lowest-frequency RoPE pair: theta^(-14/16) ~ 6e-6 rad per position
NOISE = 0.01


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE as Qwen2's: NFC, its split regex, the byte-level alphabet, its added tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [CHAT_TEMPLATE, json.dumps(WEATHER_TOOL), "What is the weather in Paris?", *[ANSWER] * 50]
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in [*TOOL_TAGS, CALL_TEXT]])
    return tok


def write_tiny_qwen2(directory: Path, seed: int = 0, weights: bool = True) -> Path:
    """Write the checkpoint (config, generation config, tokenizer files and, if ``weights``, the
    safetensors) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in [*SPECIAL, *TOOL_TAGS, CALL_TEXT, ANSWER, "Ċ"]}
    assert all(i is not None for i in ids.values()), ids
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 4096,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if weights:
        from safetensors.torch import save_file

        save_file(_weights(vocab, ids, seed), str(directory / "model.safetensors"))
    return directory


def _weights(vocab: int, ids: dict[str, int], seed: int) -> dict[str, Any]:
    import torch  # here: the tokenizer alone (cache tests) needs no torch

    g = torch.Generator().manual_seed(seed)

    def noise(*shape: int) -> Any:
        return torch.randn(*shape, generator=g) * NOISE

    # Residual dimensions: one per scripted token, and the flag.
    dims = {"Ċ": 0, "<tool_call>": 1, CALL_TEXT: 2, "</tool_call>": 3, ANSWER: 4, "<tool_response>": 5}
    flag = 6
    embed = noise(vocab, HIDDEN)
    for token, dim in dims.items():
        embed[ids[token], dim] += 1.0  # after the input norm: ~8 in that dimension (sqrt(HIDDEN))
    q_w, q_b = noise(HEADS * HEAD_DIM, HIDDEN), noise(HEADS * HEAD_DIM)
    k_w, k_b = noise(KV_HEADS * HEAD_DIM, HIDDEN), noise(KV_HEADS * HEAD_DIM)
    v_w, v_b = noise(KV_HEADS * HEAD_DIM, HIDDEN), noise(KV_HEADS * HEAD_DIM)
    o_w = noise(HIDDEN, HEADS * HEAD_DIM)
    q_b[ROPE_SLOW] += 1.0  # head 0 (kv head 0): every position asks the same question...
    k_w[ROPE_SLOW, dims["<tool_response>"]] += 10.0  # ...only <tool_response> answers: score ~20
    v_w[0, dims["<tool_response>"]] += 1.0 / 8  # its value: 1 in head dimension 0...
    o_w[flag, 0] += 1.0  # ...written to the flag
    head = noise(vocab, HIDDEN)
    chain = [("Ċ", "<tool_call>"), ("<tool_call>", CALL_TEXT), (CALL_TEXT, "</tool_call>")]
    for current, following in [*chain, ("</tool_call>", "<|im_end|>")]:
        head[ids[following], dims[current]] += 4.0
    head[ids[ANSWER], flag] += 6.0  # a tool answered: beats <tool_call> after the newline...
    head[ids["<|im_end|>"], dims[ANSWER]] += 8.0  # ...and the answer ends the turn
    layer = "model.layers.0."
    return {
        "model.embed_tokens.weight": embed,
        layer + "input_layernorm.weight": torch.ones(HIDDEN),
        layer + "self_attn.q_proj.weight": q_w,
        layer + "self_attn.q_proj.bias": q_b,
        layer + "self_attn.k_proj.weight": k_w,
        layer + "self_attn.k_proj.bias": k_b,
        layer + "self_attn.v_proj.weight": v_w,
        layer + "self_attn.v_proj.bias": v_b,
        layer + "self_attn.o_proj.weight": o_w,
        layer + "post_attention_layernorm.weight": torch.ones(HIDDEN),
        layer + "mlp.gate_proj.weight": noise(INTERMEDIATE, HIDDEN),
        layer + "mlp.up_proj.weight": noise(INTERMEDIATE, HIDDEN),
        layer + "mlp.down_proj.weight": noise(HIDDEN, INTERMEDIATE),
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": head,
    }
