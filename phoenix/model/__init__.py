"""GPTModel construction from a typed model config."""

from phoenix.model.builder import build_model, padded_vocab_size, transformer_config

__all__ = ["build_model", "padded_vocab_size", "transformer_config"]
