"""GPTModel construction from a typed model config, and its RoPE scaling."""

from phoenix.model.builder import build_model, chunk_layers, padded_vocab_size, transformer_config
from phoenix.model.chunks import chunk_iterators, unwrap
from phoenix.model.rope import current_rope, install_rope, inv_freq_and_scaling, rotary_module

__all__ = ["build_model", "chunk_iterators", "chunk_layers", "current_rope", "install_rope", "inv_freq_and_scaling",
           "padded_vocab_size", "rotary_module", "transformer_config", "unwrap"]
