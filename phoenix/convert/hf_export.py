"""``phoenix convert phoenix-to-hf CKPT OUT``: a phoenix checkpoint as a Hugging Face folder
that ``AutoModelForCausalLM.from_pretrained(OUT)`` loads offline.

Written (as ``.tmp-OUT-*``, renamed when complete): safetensors shards and
``model.safetensors.index.json``; ``config.json`` with the RoPE both as transformers 5 reads
it (``rope_parameters``) and as earlier versions do (``rope_theta`` / ``rope_scaling``); the
tokenizer files the run trained with, copied verbatim; ``phoenix_export.json`` (checkpoint,
step, tokenizer fingerprint). Padded vocabulary rows are cut; q/k/v and gate/up are
untangled. The checkpoint is loaded at TP = PP = 1 whatever layout wrote it.

The RoPE written is the one the weights were last trained with (the checkpoint step's
stage, as ``phoenix eval`` uses). When the run was imported from Hugging Face (directly or
through ``checkpoint.init_from``), the source config.json's architecture and extra keys
(token ids, ...) are kept.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from phoenix.convert.common import (
    TOKENIZER_FILES,
    ConversionError,
    atomic_output,
    conversion_config,
    one_process_runtime,
    tokenizer_summary,
)
from phoenix.convert.hf_config import hf_from_model
from phoenix.convert.hf_import import shape_of
from phoenix.convert.safetensors_io import DTYPES, HF_DTYPE_NAMES, ShardWriter, cast
from phoenix.convert.weights import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    M_EMBED,
    M_FINAL_NORM,
    M_OUTPUT,
    layer_to_hf,
)

log = logging.getLogger(__name__)


def _import_root(checkpoint: Path) -> Optional[Path]:
    """The hf-to-phoenix (or expand-vocab) folder a checkpoint lies in
    (OUT/checkpoints/step_*), if any."""
    root = checkpoint.parent.parent
    marks = ("hf_import.json", "vocab_expansion.json")
    return root if any((root / m).is_file() for m in marks) else None


def source_hf_config(checkpoint: Path, cfg) -> Optional[dict]:
    """The config.json the weights came from: of this checkpoint's import folder, or of the
    run's ``checkpoint.init_from`` (a run continued from an import)."""
    from phoenix.checkpoint.store import CheckpointError, resolve_checkpoint

    candidates = [checkpoint]
    if cfg.checkpoint.init_from:
        try:
            candidates.append(resolve_checkpoint(cfg.checkpoint.init_from))
        except CheckpointError:
            pass
    for path in candidates:
        root = _import_root(path)
        if root is not None and (root / "hf_config.json").is_file():
            return json.loads((root / "hf_config.json").read_text())
    return None


def _copy_tokenizer(tok_cfg, dst: Path) -> list[str]:
    """The run's tokenizer files, verbatim: an HF folder's files, a tokenizer.json (with
    a tokenizer_config.json next to it), or a sentencepiece model as tokenizer.model."""
    if tok_cfg.hf_dir is not None:
        src = Path(tok_cfg.hf_dir)
        names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        for n in names:
            shutil.copyfile(src / n, dst / n)
        return names
    src = Path(tok_cfg.model)
    if src.suffix == ".json":
        shutil.copyfile(src, dst / "tokenizer.json")
        names = ["tokenizer.json"]
        if (src.parent / "tokenizer_config.json").is_file():
            shutil.copyfile(src.parent / "tokenizer_config.json", dst / "tokenizer_config.json")
            names.append("tokenizer_config.json")
        return names
    shutil.copyfile(src, dst / "tokenizer.model")
    return ["tokenizer.model"]


def phoenix_to_hf(checkpoint: str | Path, out: str | Path, *, dtype: Optional[str] = None,
                  max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Export ``checkpoint`` (a checkpoint folder, or a run / hf-to-phoenix folder whose
    latest is taken) to the HF folder ``out``; ``dtype`` defaults to the checkpoint's.

    Raises ConversionError / CheckpointError naming what cannot be exported."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from tqdm import tqdm

    from phoenix.checkpoint import load_model, trained_stage
    from phoenix.checkpoint.store import resolve_checkpoint, step_of
    from phoenix.config.loader import load_saved_config
    from phoenix.config.typed import to_dict
    from phoenix.tokenizer import load_tokenizer, model_vocab_size

    path = resolve_checkpoint(checkpoint)
    saved = load_saved_config(path / "config.yaml")
    step = step_of(path)
    model = to_dict(saved.model)
    stage_rope = trained_stage(saved, step).rope
    if stage_rope is not None:
        model["rope"] = to_dict(stage_rope)
    model.pop("preset", None)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(saved.tokenizer)
    except (OSError, ValueError, RuntimeError) as e:
        if saved.model.vocab_size is None:
            raise ConversionError(f"{path}: model.vocab_size is not set and the tokenizer "
                                  f"{saved.tokenizer.path} cannot be read ({e})") from None
        log.warning("phoenix-to-hf: tokenizer %s cannot be read (%s); exporting without it",
                    saved.tokenizer.path, e)
    vocab = model_vocab_size(saved, tokenizer)
    model["vocab_size"] = vocab
    meta = load_tensors_metadata(str(path))
    stored = meta[f"{M_EMBED}" if M_EMBED in meta else next(iter(meta))].dtype
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype] if dtype else stored
    base = source_hf_config(path, saved)
    shape = shape_of(model)
    with atomic_output(out) as tmp:
        cfg = conversion_config(model, {"model": "unused.model"}, tmp)
        hf_config = hf_from_model(cfg.model, vocab, HF_DTYPE_NAMES[target], base)
        with one_process_runtime(cfg) as layout:
            (gpt,) = load_model(path, cfg, layout, vocab_size=vocab, dtype=stored,
                                initialize=False)
            state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
            writer = ShardWriter(tmp, max_shard_bytes)

            def put(name: str, tensor) -> None:
                writer.add(name, cast(name, tensor.detach().cpu(), target).clone())

            put(EMBED, state[M_EMBED][:vocab])
            for i in tqdm(range(shape.num_layers), desc="phoenix-to-hf layers", disable=not progress):
                prefix = f"decoder.layers.{i}."
                layer = {k: v for k, v in state.items() if k.startswith(prefix)}
                for name, tensor in layer_to_hf(i, layer, shape).items():
                    put(name, tensor)
            put(FINAL_NORM, state[M_FINAL_NORM])
            if not shape.tied:
                put(LM_HEAD, state[M_OUTPUT][:vocab])
            writer.close()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        root = _import_root(path)
        if root is not None and (root / "generation_config.json").is_file():
            shutil.copyfile(root / "generation_config.json", tmp / "generation_config.json")
        copied = _copy_tokenizer(saved.tokenizer, tmp) if tokenizer is not None else []
        info = {"checkpoint": str(path.resolve()), "step": step, "dtype": HF_DTYPE_NAMES[target],
                "vocab_size": vocab, "rope": model["rope"], "tokenizer_files": copied,
                "tokenizer": tokenizer_summary(tokenizer) if tokenizer is not None else None}
        (tmp / "phoenix_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)
