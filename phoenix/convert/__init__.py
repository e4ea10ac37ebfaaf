"""Checkpoint conversion between Hugging Face transformers and phoenix (Llama 2/3/3.1/3.2,
Qwen2/2.5, Mistral without sliding window; the MoE Mixtral and Qwen2-MoE).

* :mod:`phoenix.convert.hf_config`: config.json <-> the phoenix model section, refusals.
* :mod:`phoenix.convert.weights`: the tensor name map (GQA interleave, gate/up).
* :mod:`phoenix.convert.hf_moe`: Mixtral / Qwen2-MoE: ``model.moe`` and the expert tensors.
* :mod:`phoenix.convert.hf_import` / :mod:`phoenix.convert.hf_export`: the two directions.
"""

from phoenix.convert.common import ConversionError

__all__ = ["ConversionError"]
