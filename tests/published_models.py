"""The config.json of well-known models (the keys that shape the network), for the memory estimate's tests.

Each entry is copied from the model's ``config.json`` on the Hugging Face Hub (the URL beside it) and
carries the parameter count the Hub shows for the checkpoint (its safetensors metadata), where one is
published. tests/unit/test_memory_estimate.py checks the estimator's count against it;
tests/trainer/test_memory_measured.py builds each config with transformers (on the meta device) and
checks the count against ``sum(p.numel())``.
"""

from __future__ import annotations

from typing import Any

#: https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json — 6,738,415,616 parameters.
LLAMA_2_7B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
#: https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json — 8,030,261,248 parameters.
LLAMA_3_8B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
#: https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json — 7,241,732,096 parameters.
MISTRAL_7B: dict[str, Any] = {
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
#: https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json — 7,615,616,512 parameters (Qwen2's
#: query, key and value projections have biases).
QWEN2_5_7B: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
#: https://huggingface.co/huggyllama/llama-65b/blob/main/config.json — LLaMA-65B, the model of the
#: QLoRA paper's 48 GB claim (the original checkpoint has no safetensors count on the Hub).
LLAMA_65B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 8192,
    "intermediate_size": 22016,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}

#: Parameter counts the Hub publishes for the checkpoints above.
PUBLISHED_PARAMETERS: dict[str, tuple[dict[str, Any], int]] = {
    "Llama-2-7B": (LLAMA_2_7B, 6_738_415_616),
    "Llama-3-8B": (LLAMA_3_8B, 8_030_261_248),
    "Mistral-7B-v0.1": (MISTRAL_7B, 7_241_732_096),
    "Qwen2.5-7B": (QWEN2_5_7B, 7_615_616_512),
}
