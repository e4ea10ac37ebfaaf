"""Typed config of rotary position embeddings and their long-context scaling: ``model.rope``.

Six methods, one ``scaling`` field (so two scalings can never be combined by accident).
``d`` is the rotary dimension (the head dim), ``b`` the base, ``f`` the factor,
``L`` the original context length (``original_max_position_embeddings``), and the
unscaled RoPE frequencies are ``θ_i = b^(-2i/d)`` for ``i = 0 .. d/2-1``:

* ``none``: ``θ_i``.
* ``linear``: position interpolation (Chen et al., arXiv 2306.15595): positions are
  divided by ``f``, i.e. ``θ_i / f``.
* ``ntk``: NTK-aware scaling (bloc97, r/LocalLLaMA 2023): a larger base
  ``b' = b · f^(d/(d-2))``, so the lowest frequency is interpolated by ``f`` while the
  highest is untouched (the same as raising the base, "ABF", to ``b'``).
* ``dynamic_ntk``: NTK with a base that follows the current sequence length ``s``
  (as transformers' ``dynamic``): ``b' = b · (f·s/L − (f−1))^(d/(d−2))`` with
  ``s = max(seq_len, L)``; equal to ``none`` up to ``L``.
* ``yarn``: YaRN (Peng et al., arXiv 2309.00071): per-dimension blend of ``θ_i``
  (extrapolation) and ``θ_i / f`` (interpolation) with a linear ramp between the dims
  that rotate ``beta_fast`` and ``beta_slow`` times over ``L``, and an attention
  (concentration) factor on cos/sin, ``0.1·ln f + 1`` by default (eq. 22).
* ``llama3``: Llama-3.1's frequency-dependent scaling (Meta, 2024): wavelengths
  ``λ = 2π/θ`` longer than ``L/low_freq_factor`` are divided by ``f``, those shorter than
  ``L/high_freq_factor`` kept, and those between interpolated smoothly.

A leaf module: it imports nothing of phoenix but the typed-config helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from phoenix.config.typed import ConfigError

SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3")
_NEEDS_FACTOR = ("linear", "ntk", "dynamic_ntk", "yarn", "llama3")
_NEEDS_ORIGINAL = ("dynamic_ntk", "yarn", "llama3")


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding (RoPE, Su et al. arXiv 2104.09864) and its scaling."""

    base: float = 10000.0
    """The base ``b`` (theta) of the frequencies ``θ_i = b^(-2i/d)``; raised (e.g. 10k → 1M,
    "adjusted base frequency") when extending the context."""
    scaling: Literal["none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3"] = "none"
    """Long-context scaling method (one; see the module docstring for each formula)."""
    factor: Optional[float] = None
    """Context extension factor ``f`` (e.g. 4 for 8k → 32k); needed by every scaling but
    ``none``. linear: positions / f (PI, arXiv 2306.15595); ntk: base · f^(d/(d-2));
    dynamic_ntk: base · (f·s/L − f + 1)^(d/(d-2)); yarn: interpolation factor and
    0.1·ln f + 1 attention factor (arXiv 2309.00071); llama3: low-frequency divisor."""
    original_max_position_embeddings: Optional[int] = None
    """``L``, the context the model was pretrained with (before scaling). Needed by yarn
    (its correction range), llama3 (its wavelength thresholds) and dynamic_ntk (the length
    where the base starts to grow); linear uses it only to say what a stage covers."""
    beta_fast: float = 32.0
    """YaRN ``β``: dims rotating more than this many times over ``L`` are not interpolated
    (extrapolated as is); arXiv 2309.00071 §3.2, default 32."""
    beta_slow: float = 1.0
    """YaRN ``α``: dims rotating fewer than this many times over ``L`` are fully
    interpolated (θ/f); default 1."""
    mscale: Optional[float] = None
    """YaRN (DeepSeek form): with ``mscale_all_dim`` both set and non-zero, the attention
    factor is ``(0.1·mscale·ln f + 1) / (0.1·mscale_all_dim·ln f + 1)``."""
    mscale_all_dim: Optional[float] = None
    """YaRN (DeepSeek form): the denominator's ``mscale``, see ``mscale``."""
    attention_factor: Optional[float] = None
    """YaRN: the factor on cos/sin (attention temperature ``sqrt(1/t)``) given explicitly,
    overriding the one derived from ``factor`` / ``mscale`` (as transformers' yarn)."""
    truncate: bool = True
    """YaRN: round the correction range to whole dims (floor/ceil), as the paper's code
    and transformers do by default (megatron's ``correction_range_round_to_int``)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above ``L / low_freq_factor`` are divided by ``factor``."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below ``L / high_freq_factor`` are kept; between the two
    thresholds ``θ' = (1−s)·θ/f + s·θ`` with ``s = (L/λ − low) / (high − low)``."""

    def __post_init__(self):
        if not isinstance(self.scaling, str) or self.scaling not in SCALINGS:
            raise ConfigError(f"scaling: {self.scaling!r} is not one of {', '.join(SCALINGS)} "
                              f"(one method per rope; methods cannot be combined)")
        if not self.base > 1:
            raise ConfigError(f"base: must be > 1, got {self.base}")
        if self.factor is not None and not self.factor > 0:
            raise ConfigError(f"factor: must be > 0, got {self.factor}")
        if self.scaling in _NEEDS_FACTOR and self.factor is None:
            raise ConfigError(f"factor: scaling '{self.scaling}' needs a factor (e.g. 4)")
        if self.scaling == "none" and self.factor is not None:
            raise ConfigError(f"factor: {self.factor} has no effect with scaling 'none' (set a "
                              f"scaling or remove it)")
        L = self.original_max_position_embeddings
        if L is not None and L <= 0:
            raise ConfigError(f"original_max_position_embeddings: must be > 0, got {L}")
        if self.scaling in _NEEDS_ORIGINAL and L is None:
            raise ConfigError(f"original_max_position_embeddings: scaling '{self.scaling}' "
                              f"needs the pretrained context length")
        if self.scaling == "llama3":
            if not self.low_freq_factor > 0:
                raise ConfigError(f"low_freq_factor: must be > 0, got {self.low_freq_factor}")
            if self.high_freq_factor <= self.low_freq_factor:
                raise ConfigError(f"high_freq_factor: must be > low_freq_factor "
                                  f"{self.low_freq_factor}, got {self.high_freq_factor}")
        if self.scaling == "yarn":
            if self.beta_fast <= self.beta_slow or self.beta_slow <= 0:
                raise ConfigError(f"beta_fast: must be > beta_slow > 0, got beta_fast "
                                  f"{self.beta_fast}, beta_slow {self.beta_slow}")
            if self.attention_factor is not None and not self.attention_factor > 0:
                raise ConfigError(f"attention_factor: must be > 0, got {self.attention_factor}")
            if self.attention_factor not in (None, 1.0) and self.factor <= 1:
                raise ConfigError(f"attention_factor: {self.attention_factor} needs factor > 1 "
                                  f"(megatron's concentration factor is 1 for factor <= 1)")

    def covered_length(self, max_seq_length: int) -> int:
        """The context this RoPE is meant for: ``factor × L`` for the extending methods
        (linear without ``L``: ``factor × max_seq_length``), ``max_seq_length`` otherwise."""
        if self.scaling in ("none", "ntk"):
            return max_seq_length
        L = self.original_max_position_embeddings or max_seq_length
        return int(self.factor * L)

    def describe(self) -> str:
        """One line for logs, e.g. ``yarn(base=10000, factor=4, L=4096)``."""
        if self.scaling == "none":
            return f"rope(base={self.base:g})"
        L = self.original_max_position_embeddings
        return (f"{self.scaling}(base={self.base:g}, factor={self.factor:g}"
                + (f", L={L}" if L else "") + ")")
