"""``phoenix expand-vocab BASE ... --checkpoint CKPT --out OUT``: a checkpoint resized to an
expanded tokenizer, written like an hf-to-phoenix folder::

    OUT/checkpoints/step_000000/   weights only (TP=PP=1, reshardable; no optimizer state,
                                   so Adam starts fresh for every row under init_from)
    OUT/tokenizer/                 the expanded tokenizer (+ vocab_expansion.json)
    OUT/model.yaml                 the model section with the new vocab_size
    OUT/vocab_expansion.json       old/new sizes, the rows initialised, fingerprints
    OUT/hf_config.json             kept from an HF import (phoenix-to-hf keeps its keys)

Rows of the existing ids are copied bit for bit. Row ``i`` of a new token is the mean of
the old rows of its old sub-tokens: the token's string split by the OLD tokenizer (for a
byte-level BPE, the old BPE of its byte string; Gee et al. 2022's fast vocabulary
transfer), separately for the input embedding and, when untied, the output layer. The
vocabulary is re-padded to ``make_vocab_size_divisible_by`` (phoenix.model.builder.
padded_vocab_size, TP-independent for the usual 128); padding rows are zero. When the old
model had rows past its tokenizer (reserved rows, e.g. Qwen2), new ids first reuse them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from phoenix.convert.common import (
    TOKENIZER_FILES,
    ConversionError,
    atomic_output,
    conversion_config,
    one_process_runtime,
)
from phoenix.convert.weights import M_EMBED, M_OUTPUT

log = logging.getLogger(__name__)
SPACE = "\u2581"


def old_subtoken_ids(old, new, tid: int) -> list[int]:
    """Ids, in the OLD tokenizer, of the string of the new tokenizer's token ``tid``."""
    from phoenix.tokenizer import HFTokenizer

    if isinstance(new, HFTokenizer):
        added = new.backend.get_added_tokens_decoder()
        if tid in added:  # an added (verbatim) token: its text, without BOS
            return old.backend.encode(added[tid].content, add_special_tokens=False).ids
        return [t.id for t in old.backend.model.tokenize(new.id_to_token(tid))]
    piece = new.id_to_token(tid)
    if piece.startswith(SPACE):  # sentencepiece's dummy prefix gives the leading "▁" back
        return old.encode(piece[1:].replace(SPACE, " "))
    ids = old.encode(piece.replace(SPACE, " "))
    return ids[1:] if ids and old.id_to_token(ids[0]) == SPACE else ids


def grow_rows(weight: torch.Tensor, rows: int, keep: int, sources: dict[int, list[int]]) -> torch.Tensor:
    """``weight`` with ``rows`` rows: the first ``keep`` copied, row ``i`` of ``sources``
    the fp32 mean of the old rows ``sources[i]`` (of all ``keep`` rows when empty), the
    rest zero."""
    out = weight.new_zeros((rows, *weight.shape[1:]))
    out[:keep] = weight[:keep]
    old = weight[:keep].float()
    for tid, ids in sources.items():
        out[tid] = (old[ids].mean(0) if ids else old.mean(0)).to(weight.dtype)
    return out


def _copy_tokenizer(new_path: Path, dst: Path) -> dict:
    """Copy an expanded tokenizer given by path into ``dst``; its config section."""
    dst.mkdir(parents=True)
    if new_path.is_dir():
        for name in TOKENIZER_FILES:
            if (new_path / name).is_file():
                shutil.copyfile(new_path / name, dst / name)
        return {"hf_dir": "tokenizer"}
    if new_path.suffix == ".json":
        shutil.copyfile(new_path, dst / "tokenizer.json")
        if (new_path.parent / "tokenizer_config.json").is_file():
            shutil.copyfile(new_path.parent / "tokenizer_config.json", dst / "tokenizer_config.json")
        return {"hf_dir": "tokenizer"}
    shutil.copyfile(new_path, dst / "tokenizer.model")
    return {"model": "tokenizer/tokenizer.model"}


def expand_checkpoint(checkpoint: str | Path, base: str | Path, out: str | Path, *,
                      surfaces: Optional[list[str]] = None,
                      tokenizer: Optional[str | Path] = None) -> dict:
    """Resize ``checkpoint`` (trained with the tokenizer ``base``) to the tokenizer that
    ``surfaces`` expand ``base`` into, or to the already expanded ``tokenizer``; write
    ``out`` (see the module docstring). Returns the vocab_expansion.json record.

    Raises ConversionError (or ExpansionError) naming what does not fit: a tokenizer that
    moves an existing id, a checkpoint trained with another tokenizer than ``base``."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    from phoenix.checkpoint import CheckpointStore, load_model
    from phoenix.checkpoint.store import resolve_checkpoint
    from phoenix.config import dump_config
    from phoenix.config.loader import load_saved_config
    from phoenix.config.typed import to_dict
    from phoenix.convert.hf_export import source_hf_config
    from phoenix.model import build_model
    from phoenix.model.builder import padded_vocab_size
    from phoenix.tokenizer import load_tokenizer, model_vocab_size
    from phoenix.tokenizer.expand_vocab import check_extends, expand_tokenizer

    if (surfaces is None) == (tokenizer is None):
        raise ConversionError("give the new tokens or an expanded tokenizer (one of them)")
    path = resolve_checkpoint(checkpoint)
    saved = load_saved_config(path / "config.yaml")
    old_tok = load_tokenizer(base)
    try:
        trained_with = load_tokenizer(saved.tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("expand-vocab: cannot read the tokenizer %s of %s (%s); trusting that it is "
                    "%s", saved.tokenizer.path, path, e, base)
    else:
        if trained_with.fingerprint != old_tok.fingerprint:
            raise ConversionError(f"{path} was trained with the tokenizer {saved.tokenizer.path}, "
                                  f"not {base} (fingerprints differ): give that one as the base")
    model = to_dict(saved.model)
    model.pop("preset", None)
    old_vocab = model_vocab_size(saved, old_tok)
    if old_tok.vocab_size > old_vocab:
        raise ConversionError(f"{base} has {old_tok.vocab_size} tokens, more than the "
                              f"{old_vocab} rows of {path}")
    meta = load_tensors_metadata(str(path))
    stored = meta[M_EMBED].dtype
    out = Path(out)
    with atomic_output(out) as tmp:
        if surfaces is not None:
            expansion = expand_tokenizer(base, surfaces, tmp / "tokenizer")
            section = {"model": "tokenizer/tokenizer.model"} if expansion.kind == "sentencepiece" \
                else {"hf_dir": "tokenizer"}
        else:
            section = _copy_tokenizer(Path(tokenizer), tmp / "tokenizer")
        new_tok = load_tokenizer(tmp / section.get("hf_dir", section.get("model", "")))
        check_extends(old_tok, new_tok)
        new_ids = range(old_tok.vocab_size, new_tok.vocab_size)
        if not new_ids:
            raise ConversionError(f"the expanded tokenizer adds no token to {base}")
        sources = {i: old_subtoken_ids(old_tok, new_tok, i) for i in new_ids}
        bad = [i for i, ids in sources.items() if any(j >= old_tok.vocab_size for j in ids)]
        if bad:
            raise ConversionError(f"new token {bad[0]}: its old sub-tokens {sources[bad[0]]} are "
                                  f"not ids of {base}")
        new_vocab = max(old_vocab, new_tok.vocab_size)
        divisible = model.get("make_vocab_size_divisible_by", 128)
        padded = padded_vocab_size(new_vocab, divisible, 1)
        tok_section = {k: str(out / v) for k, v in section.items()}
        old_cfg = conversion_config(model, {"model": "unused.model"}, tmp)
        model["vocab_size"] = new_vocab
        cfg = conversion_config(model, tok_section, out)
        with one_process_runtime(cfg) as layout:
            (old_gpt,) = load_model(path, old_cfg, layout, vocab_size=old_vocab, dtype=stored,
                                    initialize=False)
            state = old_gpt.state_dict()
            del old_gpt
            keep = min(old_vocab, old_tok.vocab_size)  # rows past the tokenizer are reused
            state[M_EMBED] = grow_rows(state[M_EMBED], padded, keep, sources)
            if not model["tie_embeddings"]:
                state[M_OUTPUT] = grow_rows(state[M_OUTPUT], padded, keep, sources)
            (gpt,) = build_model(cfg, layout, new_vocab, wrap_ddp=False, initialize=False,
                                 dtype=stored)
            gpt.load_state_dict(state)
            del state
            CheckpointStore(tmp / "checkpoints", layout.rank, layout.world_size).save(
                0, [gpt], None, {"format": 2, "step": 0, "states": {}}, dump_config(cfg))
        (tmp / "model.yaml").write_text(
            f"# {path} with the vocabulary expanded to {new_vocab} by phoenix expand-vocab.\n"
            + yaml.safe_dump(model, sort_keys=False))
        hf_config = source_hf_config(path, saved)
        if hf_config is not None:
            (tmp / "hf_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        info = {"source": str(path.resolve()), "base_tokenizer": str(base),
                "base_fingerprint": old_tok.fingerprint, "tokenizer": str(out / "tokenizer"),
                "fingerprint": new_tok.fingerprint, "old_vocab_size": old_vocab,
                "new_vocab_size": new_vocab, "padded_vocab_size": padded,
                "new_rows": [new_ids.start, new_ids.stop], "reused_reserved_rows":
                    max(0, min(old_vocab, new_ids.stop) - new_ids.start),
                "init": "mean of the old sub-token rows (input embedding"
                        + (")" if model["tie_embeddings"] else " and output layer separately)"),
                "dtype": str(stored).replace("torch.", ""),
                "use": {"checkpoint.init_from": str(out), "model.preset": str(out / "model.yaml"),
                        **{f"tokenizer.{k}": v for k, v in tok_section.items()}}}
        (tmp / "vocab_expansion.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
