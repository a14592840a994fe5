"""Model shapes for the simulator: transformers configs written out in code (no download, random weights).

Each entry copies the fields of the model's published ``config.json`` that decide memory: vocabulary V,
hidden size d, layers, MLP width, attention heads, tied embeddings. Rope settings are kept where the config
names them, although they cost no memory.

Gemma 2 is simulated without its two soft-caps. logitsam refuses a soft-capped output head in training
(``models.check_linear_head``: the logits must be ``hidden @ W^T``), so the final soft-cap is off, as a run
would need it to be. transformers refuses SDPA for Gemma 2 because of the attention soft-cap, so that is
off too, and attention runs through SDPA. SDPA holds no (T x T) scores, and neither do the flash-attention
kernels that GPU runs of Gemma 2 use.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import Gemma2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, PreTrainedConfig, Qwen2Config


def _qwen25_7b() -> PreTrainedConfig:  # Qwen/Qwen2.5-7B
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       tie_word_embeddings=False)


def _llama3_8b() -> PreTrainedConfig:  # meta-llama/Meta-Llama-3-8B
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                       tie_word_embeddings=False)


def _mistral_7b() -> PreTrainedConfig:  # mistralai/Mistral-7B-v0.1
    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         sliding_window=4096, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4}, tie_word_embeddings=False)


def _gemma2_2b() -> PreTrainedConfig:  # google/gemma-2-2b, soft-caps off (see the module docstring)
    return Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, max_position_embeddings=8192, tie_word_embeddings=True,
                        final_logit_softcapping=None, attn_logit_softcapping=None)


def _pythia_28b() -> PreTrainedConfig:  # EleutherAI/pythia-2.8b
    return GPTNeoXConfig(vocab_size=50304, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048, use_parallel_residual=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
                         tie_word_embeddings=False)


def _tiny_llama() -> PreTrainedConfig:  # the tests' shape: every buffer in KiB to MiB, a step in a second
    return LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=False)


SHAPES: dict[str, Callable[[], PreTrainedConfig]] = {
    "qwen2.5-7b": _qwen25_7b,
    "llama-3-8b": _llama3_8b,
    "mistral-7b": _mistral_7b,
    "gemma-2-2b": _gemma2_2b,
    "pythia-2.8b": _pythia_28b,
    "tiny-llama": _tiny_llama,
}


def model_config(name: str) -> PreTrainedConfig:
    """The config of shape ``name`` (a key of ``SHAPES``), with the KV cache off as in training."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose from {sorted(SHAPES)}")
    config = SHAPES[name]()
    config.use_cache = False
    return config
