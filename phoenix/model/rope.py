"""RoPE scaling for long context: the frequencies of every method, and their installation
in megatron-core's ``GPTModel``.

:func:`inv_freq_and_scaling` is the reference: the inverse frequencies and attention
scaling of each ``model.rope.scaling`` (formulas in :mod:`phoenix.config.rope`), written
from the papers. The model uses megatron-core's own modules wherever one computes exactly
that, and a small subclass where megatron has none:

============  =====================================================================
none          ``RotaryEmbedding(rotary_base=b)``
linear        ``RotaryEmbedding(seq_len_interpolation_factor=f)`` (positions / f)
ntk           ``RotaryEmbedding(rotary_base=b·f^(d/(d-2)))``
yarn          ``YarnRotaryEmbedding`` (``position_embedding_type='yarn'``) with the
              ``yarn_*`` attributes on the TransformerConfig; attention.py multiplies
              cos/sin of q and k by the concentration factor it derives from them
llama3        ``RotaryEmbedding(rope_scaling=True, rope_scaling_factor=f)`` when
              low/high/L are megatron's hard-coded 1/4/8192, else :class:`ScaledRotaryEmbedding`
dynamic_ntk   :class:`ScaledRotaryEmbedding`: the base follows the sequence length of
              each forward (megatron-core has no dynamic NTK)
============  =====================================================================

:func:`rotary_module` is the one place a ``RopeConfig`` becomes a module (that table's
choice); :func:`install_rope` puts it in a ``GPTModel``, at the build
(:func:`phoenix.model.build_model`) and at every switch (a context-extension stage begins).
RoPE frequencies are not parameters (megatron drops ``inv_freq`` when loading a state
dict), so a checkpoint loads under any RoPE.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from phoenix.config import RopeConfig
from phoenix.model.chunks import unwrap

# megatron's RotaryEmbedding._apply_scaling hard-codes these (Llama-3.1's values).
_MEGATRON_LLAMA3 = (1.0, 4.0, 8192)
_YARN_ATTRS = ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings",
               "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim",
               "yarn_correction_range_round_to_int")


# ------------------------------------------------------------------ the formulas


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """``θ_i = base^(-2i/dim)``, i = 0 .. dim/2-1, in float64."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return base ** -exponents


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor ``0.1·mscale·ln(s) + 1`` (arXiv 2309.00071 eq. 22); 1 for
    s <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(rope: RopeConfig) -> float:
    """The factor on cos/sin of YaRN: ``attention_factor`` if given, else DeepSeek's ratio
    when ``mscale`` and ``mscale_all_dim`` are both non-zero, else ``0.1·ln f + 1``."""
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        f = rope.factor
        return _yarn_mscale(f, rope.mscale) / _yarn_mscale(f, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """YaRN "NTK-by-parts": dims that rotate more than ``beta_fast`` times over L keep θ,
    dims that rotate fewer than ``beta_slow`` times get θ/f, a linear ramp in between."""
    base, f, L = rope.base, rope.factor, rope.original_max_position_embeddings

    def dim_of(rotations: float) -> float:
        # the dim index i whose wavelength 2π·base^(2i/d) fits ``rotations`` times in L
        return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(rope.beta_fast), dim_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a step, not a division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (θ), 0: interpolate (θ/f)
    theta = _default_inv_freq(base, dim)
    return theta / f * (1 - keep) + theta * keep


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Llama-3.1: divide long wavelengths by f, keep short ones, blend the band between."""
    theta = _default_inv_freq(rope.base, dim)
    f, L = rope.factor, rope.original_max_position_embeddings
    low, high = rope.low_freq_factor, rope.high_freq_factor
    wavelength = 2 * math.pi / theta
    smooth = (L / wavelength - low) / (high - low)  # 0 at L/low, 1 at L/high
    blended = (1 - smooth) * theta / f + smooth * theta
    out = torch.where(wavelength > L / low, theta / f, blended)
    return torch.where(wavelength < L / high, theta, out)


def ntk_base(rope: RopeConfig, dim: int, seq_len: Optional[int] = None) -> float:
    """The base of ``ntk`` (``b·f^(d/(d-2))``) or ``dynamic_ntk`` at ``seq_len``
    (``b·(f·s/L − (f−1))^(d/(d-2))`` with ``s = max(seq_len, L)``)."""
    if rope.scaling == "ntk":
        return rope.base * rope.factor ** (dim / (dim - 2))
    L = rope.original_max_position_embeddings
    s = max(seq_len or L, L)
    return rope.base * (rope.factor * s / L - (rope.factor - 1)) ** (dim / (dim - 2))


def inv_freq_and_scaling(rope: RopeConfig, head_dim: int,
                         seq_len: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, ``[head_dim // 2]``) and attention scaling (the factor
    on cos and sin) of ``rope`` for heads of ``head_dim``. ``seq_len`` is the length of the
    current sequence; only ``dynamic_ntk`` depends on it (None: the original length)."""
    kind = rope.scaling
    if kind == "none":
        inv_freq = _default_inv_freq(rope.base, head_dim)
    elif kind == "linear":
        inv_freq = _default_inv_freq(rope.base, head_dim) / rope.factor
    elif kind in ("ntk", "dynamic_ntk"):
        inv_freq = _default_inv_freq(ntk_base(rope, head_dim, seq_len), head_dim)
    elif kind == "yarn":
        return _yarn_inv_freq(rope, head_dim).float(), yarn_attention_factor(rope)
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(rope, head_dim)
    else:
        raise ValueError(f"unknown rope scaling {kind!r}")
    return inv_freq.float(), 1.0


# ------------------------------------------------------------------ megatron-core


def _uses_megatron_llama3(rope: RopeConfig) -> bool:
    return (rope.low_freq_factor, rope.high_freq_factor,
            rope.original_max_position_embeddings) == _MEGATRON_LLAMA3


def needs_phoenix_module(rope: Optional[RopeConfig]) -> bool:
    """True when megatron-core has no module computing ``rope`` exactly."""
    return rope is not None and (rope.scaling == "dynamic_ntk"
                                 or rope.scaling == "llama3" and not _uses_megatron_llama3(rope))


def gpt_rope_kwargs(rope: RopeConfig, head_dim: int) -> dict:
    """megatron's rotary settings of ``rope`` (the ``GPTModel`` / ``RotaryEmbedding``
    keyword arguments); YaRN's other settings live on the TransformerConfig
    (:func:`set_yarn_config`)."""
    kwargs = {"position_embedding_type": "yarn" if rope.scaling == "yarn" else "rope",
              "rotary_base": rope.base}
    if rope.scaling == "linear":
        kwargs["seq_len_interpolation_factor"] = rope.factor
    elif rope.scaling == "ntk":
        kwargs["rotary_base"] = ntk_base(rope, head_dim)
    elif rope.scaling == "llama3" and _uses_megatron_llama3(rope):
        kwargs.update(rope_scaling=True, rope_scaling_factor=rope.factor)
    return kwargs


def set_yarn_config(config, rope: Optional[RopeConfig]) -> None:
    """Set (yarn) or remove (any other rope) the ``yarn_*`` attributes that ``GPTModel``
    reads with getattr and attention.py turns into the concentration factor on cos/sin.

    megatron's factor is ``mscale'(f, m) / mscale'(f, m_all)`` when both are given, else
    ``0.1·ln f + 1``; an explicit ``attention_factor`` A is expressed exactly as
    ``m = (A − 1) / (0.1·ln f)``, ``m_all = 0`` (``mscale'(f, 0) = 1``)."""
    if rope is None or rope.scaling != "yarn":
        for attr in _YARN_ATTRS:
            if hasattr(config, attr):
                delattr(config, attr)
        return
    for attr, value in _yarn_values(rope).items():
        setattr(config, attr, value)


def _yarn_values(rope: RopeConfig) -> dict:
    """The ``yarn_*`` TransformerConfig attributes of a yarn ``rope`` (see set_yarn_config)."""
    mscale, mscale_all_dim = ((rope.mscale, rope.mscale_all_dim)
                              if rope.mscale and rope.mscale_all_dim else (None, None))
    if rope.attention_factor is not None:  # RopeConfig refuses A != 1 with factor <= 1
        ln_f = math.log(rope.factor) if rope.factor > 1 else 0.0
        mscale = (rope.attention_factor - 1) / (0.1 * ln_f) if ln_f else 1.0
        mscale_all_dim = 0.0
    values = (rope.factor, rope.original_max_position_embeddings, rope.beta_fast,
              rope.beta_slow, mscale, mscale_all_dim, rope.truncate)
    return dict(zip(_YARN_ATTRS, values))


def _rotary_embedding_cls():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class ScaledRotaryEmbedding(RotaryEmbedding):
        """megatron's ``RotaryEmbedding`` with phoenix's inverse frequencies: llama3 with any
        low/high/L, and dynamic NTK, whose base follows the sequence length of each call
        (``max_seq_len + offset``, at least L), as transformers' ``dynamic`` does. Its
        ``forward`` stays megatron's (lru-cached per length, which fixes the frequencies)."""

        def __init__(self, rope: RopeConfig, kv_channels: int, **kwargs):
            super().__init__(kv_channels=kv_channels, rotary_percent=1.0,
                             rotary_base=rope.base, **kwargs)
            self.rope, self.dim = rope, kv_channels
            self.inv_freq = inv_freq_and_scaling(rope, kv_channels)[0].to(self.inv_freq.device)

        def inv_freq_at(self, seq_len: int) -> torch.Tensor:
            """The inverse frequencies used for a sequence of ``seq_len`` positions."""
            if self.rope.scaling != "dynamic_ntk":
                return self.inv_freq
            return inv_freq_and_scaling(self.rope, self.dim, seq_len)[0].to(self.inv_freq.device)

        def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
            inv_freq = self.inv_freq_at(getattr(self, "_length", None) or max_seq_len + offset)
            seq = torch.arange(max_seq_len, device=inv_freq.device, dtype=inv_freq.dtype) + offset
            return torch.outer(seq, inv_freq)

        def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                    cp_group=None) -> torch.Tensor:
            """megatron's table ``[s, 1, 1, d]``; with ``document_lengths`` set (dynamic NTK
            and documents kept apart, :func:`document_rope`) a table ``[s, b, 1, d]`` whose
            row of each token has the base of its own document's length, as the document
            alone gets it (transformers: ``max(position_ids) + 1``). RoPE is relative, so a
            document attending only to itself needs no restarted positions, only its base."""
            lengths = getattr(self, "document_lengths", None)
            if lengths is None or self.rope.scaling != "dynamic_ntk":
                return super().forward(max_seq_len, offset, packed_seq, cp_group)
            if packed_seq or lengths.shape[1] != max_seq_len or offset:
                raise ValueError("dynamic_ntk with data.document_mask: per-document bases need "
                                 "the dense document mask (not packed THD sequences)")
            distinct = torch.unique(lengths.cpu()).tolist()
            tables = []
            for n in distinct:
                self._length = int(n)
                try:
                    tables.append(self.get_emb(max_seq_len)[:, 0, 0, :])  # [s, d]
                finally:
                    self._length = None
            table = torch.stack(tables)  # [k, s, d]
            which = torch.searchsorted(torch.tensor(distinct, device=lengths.device), lengths)
            rows = torch.arange(max_seq_len, device=lengths.device).expand_as(lengths)
            emb = table[which.to(table.device), rows.to(table.device)]  # [b, s, d]
            emb = emb.transpose(0, 1)[:, :, None, :].contiguous()  # [s, b, 1, d]
            cp_group = cp_group if cp_group is not None else self.cp_group
            if cp_group is not None and cp_group.size() > 1:
                from megatron.core.models.common.embeddings.rope_utils import (
                    get_pos_emb_on_this_cp_rank,
                )
                emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
            return emb

    return ScaledRotaryEmbedding


def document_lengths(position_ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """int [b, s]: for every token, the length of its document (its largest position id + 1),
    the ``s`` of dynamic NTK for the document alone."""
    b, s = segments.shape
    starts = torch.zeros_like(segments, dtype=torch.long)
    starts[:, 1:] = (segments[:, 1:] != segments[:, :-1]).long()
    key = (starts.cumsum(1) + torch.arange(b, device=segments.device)[:, None] * s).reshape(-1)
    longest = torch.zeros(b * s, dtype=torch.long, device=segments.device)
    longest = longest.scatter_reduce(0, key, position_ids.reshape(-1).long(), "amax")
    return (longest[key] + 1).reshape(b, s)


class document_rope:
    """Context: the rotary module of ``model`` (a dynamic-NTK :class:`ScaledRotaryEmbedding`)
    gives every document the base of its own length for one forward; a no-op for any
    other rope."""

    def __init__(self, model, position_ids, segments):
        rope = current_rope(model)
        self.module = (unwrap(model).rotary_pos_emb if rope is not None
                       and rope.scaling == "dynamic_ntk" and position_ids is not None else None)
        self.args = (position_ids, segments)

    def __enter__(self):
        if self.module is not None:
            self.module.document_lengths = document_lengths(*self.args)
        return self

    def __exit__(self, *exc):
        if self.module is not None:
            self.module.document_lengths = None
        return False


def current_rope(chunk) -> Optional[RopeConfig]:
    """The RopeConfig a model chunk was built or last switched with (None: learned
    absolute positions or a model phoenix did not build)."""
    return getattr(unwrap(chunk), "phoenix_rope", None)


def rotary_module(rope: RopeConfig, model) -> torch.nn.Module:
    """The rotary embedding module of ``rope`` for the ``GPTModel`` ``model`` (its head
    size, ``rotary_percent``, interleaving, CPU initialisation and context-parallel group):
    megatron's ``RotaryEmbedding`` or ``YarnRotaryEmbedding`` where one computes ``rope``
    exactly, else :class:`ScaledRotaryEmbedding` (the table above). Every rotary module
    of a phoenix model comes from here, at the build and at every switch."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )

    config = model.config
    head_dim = config.kv_channels
    common = dict(kv_channels=head_dim, rotary_interleaved=config.rotary_interleaved,
                  use_cpu_initialization=config.use_cpu_initialization,
                  cp_group=model.pg_collection.cp)
    if needs_phoenix_module(rope):
        return _rotary_embedding_cls()(rope, **common)
    if rope.scaling == "yarn":
        y = _yarn_values(rope)
        return YarnRotaryEmbedding(
            rotary_percent=model.rotary_percent, rotary_base=rope.base,
            scaling_factor=y["yarn_rotary_scaling_factor"],
            original_max_position_embeddings=y["yarn_original_max_position_embeddings"],
            beta_fast=y["yarn_beta_fast"], beta_slow=y["yarn_beta_slow"],
            mscale=y["yarn_mscale"], mscale_all_dim=y["yarn_mscale_all_dim"],
            correction_range_round_to_int=y["yarn_correction_range_round_to_int"], **common)
    kwargs = gpt_rope_kwargs(rope, head_dim)
    return RotaryEmbedding(
        rotary_percent=model.rotary_percent,
        seq_len_interpolation_factor=kwargs.get("seq_len_interpolation_factor"),
        rotary_base=kwargs["rotary_base"], rope_scaling=kwargs.get("rope_scaling", False),
        rope_scaling_factor=kwargs.get("rope_scaling_factor", 8.0), **common)


def install_rope(chunk, rope: RopeConfig) -> None:
    """Give a ``GPTModel`` chunk (or its DDP wrapper) the RoPE of ``rope``: the module of
    :func:`rotary_module` as ``rotary_pos_emb``, ``position_embedding_type``, and the
    config's yarn attributes (set or removed). Used by the build and by every switch."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )

    model = unwrap(chunk)
    if getattr(model, "position_embedding_type", None) not in ("rope", "yarn"):
        raise ValueError("install_rope: the model has no rotary embedding "
                         f"(position_embedding_type {model.position_embedding_type!r})")
    kwargs = gpt_rope_kwargs(rope, model.config.kv_channels)
    device = model.rotary_pos_emb.inv_freq.device if hasattr(model, "rotary_pos_emb") else None
    set_yarn_config(model.config, rope)
    module = rotary_module(rope, model)
    if device is not None and module.inv_freq.device != device:
        module.inv_freq = module.inv_freq.to(device)
    model.rotary_pos_emb = module
    model.position_embedding_type = kwargs["position_embedding_type"]
    model.rotary_base = kwargs["rotary_base"]
    model.rotary_scaling = kwargs.get("rope_scaling", False)
    model.rotary_pos_emb_cache = {}
    # forward is lru-cached on the class (keyed by instance): drop the old module's tables.
    RotaryEmbedding.forward.cache_clear()
    YarnRotaryEmbedding.forward.cache_clear()
    model.phoenix_rope = rope


def rope_module_inv_freq(chunk, seq_len: int) -> torch.Tensor:
    """The inverse frequencies a chunk's rotary module applies to a sequence of
    ``seq_len`` positions, read from the table it produces (row 1 = position 1): what the
    model really uses, whichever megatron or phoenix module it is. Positions scaled by
    linear interpolation are folded in (``θ / f``)."""
    model = unwrap(chunk)
    out = model.rotary_pos_emb(seq_len)
    emb = out[0] if isinstance(out, tuple) else out
    return emb[1, 0, 0, : emb.shape[-1] // 2].float().cpu()
