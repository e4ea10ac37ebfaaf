"""Tokenizers for Phoenix. Only SentencePiece is supported for now."""

from phoenix.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece

__all__ = ["SentencePieceTokenizer", "train_sentencepiece"]
