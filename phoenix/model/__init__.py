"""GPTModel construction from a typed model config, and its RoPE scaling."""

from phoenix.model.builder import build_model, padded_vocab_size, transformer_config
from phoenix.model.rope import current_rope, install_rope, inv_freq_and_scaling

__all__ = ["build_model", "current_rope", "install_rope", "inv_freq_and_scaling",
           "padded_vocab_size", "transformer_config"]
