"""``phoenix convert hf-to-phoenix HF_DIR OUT``: a Hugging Face decoder (dense, or the MoE
Mixtral / Qwen2-MoE) as a phoenix checkpoint.

Output folder (written as ``.tmp-OUT-*`` and renamed when complete)::

    OUT/checkpoints/step_000000/   the weights (dist_checkpointing, TP=PP=EP=1, reshardable)
    OUT/checkpoints/latest
    OUT/model.yaml                 the phoenix model section (use as ``model.preset``)
    OUT/tokenizer/                 the tokenizer files, copied verbatim
    OUT/hf_config.json             the source config.json (export keeps its extra keys)
    OUT/hf_import.json             provenance: source, dtype, suggested TP/PP, tokenizer

Train from it with ``checkpoint.init_from: OUT``, ``model.preset: OUT/model.yaml`` and
``tokenizer.hf_dir: OUT/tokenizer`` at any TP/PP/EP the check below accepted.
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
    ConversionError,
    atomic_output,
    check_layout,
    conversion_config,
    copy_tokenizer_files,
    one_process_runtime,
    tokenizer_summary,
)
from phoenix.convert.hf_config import model_from_hf, read_hf_config
from phoenix.convert.hf_moe import moe_shape
from phoenix.convert.safetensors_io import DTYPES, SafetensorsReader, cast
from phoenix.convert.weights import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    M_EMBED,
    M_FINAL_NORM,
    M_OUTPUT,
    Shape,
    hf_global_names,
    hf_layer_names,
    layer_to_megatron,
    pad_rows,
)

log = logging.getLogger(__name__)


def shape_of(model: dict) -> Shape:
    return Shape(num_layers=model["num_layers"], hidden=model["hidden_size"],
                 heads=model["num_attention_heads"],
                 groups=model.get("num_query_groups") or model["num_attention_heads"],
                 qkv_bias=model.get("add_qkv_bias", False), tied=model["tie_embeddings"],
                 moe=moe_shape(model))


def _check_tensor_names(reader: SafetensorsReader, shape: Shape) -> None:
    expected = set(hf_global_names(shape))
    for i in range(shape.num_layers):
        expected.update(hf_layer_names(i, shape))
    derived = {n for n in reader.names if n.endswith("rotary_emb.inv_freq")}  # old RoPE buffers
    allowed = expected | derived | ({LM_HEAD} if shape.tied else set())
    missing, extra = sorted(expected - reader.names), sorted(reader.names - allowed)
    if missing:
        raise ConversionError(f"{reader.folder}: tensor(s) missing: {missing[:5]}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra:
        raise ConversionError(f"{reader.folder}: tensor(s) the config does not explain (refused "
                              f"rather than dropped): {extra[:5]}"
                              + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))


def _tokenizer_section(hf_dir: Path, out: Path, copied: list[str]) -> dict:
    if "tokenizer.json" in copied:
        return {"hf_dir": str(out / "tokenizer")}
    if "tokenizer.model" in copied:
        return {"model": str(out / "tokenizer" / "tokenizer.model")}
    log.warning("hf-to-phoenix: %s has no tokenizer.json or tokenizer.model; set tokenizer.* "
                "yourself when training from the checkpoint", hf_dir)
    return {"hf_dir": str(out / "tokenizer")}


def _check_tokenizer_fits(hf_dir: Path, vocab_size: int) -> None:
    """Refuse a folder whose tokenizer has ids past the model's embedding rows: those ids
    would index past the embedding in training (an unreadable tokenizer is only warned
    about, after the conversion)."""
    from phoenix.tokenizer import load_tokenizer

    if (hf_dir / "tokenizer.json").is_file():
        where, source = hf_dir, "tokenizer.json"
    elif (hf_dir / "tokenizer.model").is_file():
        where, source = hf_dir / "tokenizer.model", "tokenizer.model"
    else:
        return
    try:
        ids = load_tokenizer(where).vocab_size
    except (OSError, ValueError, RuntimeError):
        return
    if ids > vocab_size:
        raise ConversionError(f"{hf_dir}: {source} has {ids} token ids but the model has "
                              f"{vocab_size} embedding rows (config.json vocab_size): ids "
                              f"{vocab_size}..{ids - 1} have no row; this tokenizer does not "
                              f"belong to these weights, nothing was written")


def hf_to_phoenix(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
                  dtype: Optional[str] = None, progress: bool = True) -> Path:
    """Convert the HF folder ``hf_dir`` into the phoenix folder ``out`` (see the module
    docstring); ``tp``/``pp``/``ep`` are checked and recorded as the suggested layout; ``dtype``
    (fp32/bf16/fp16) defaults to the source's. Returns ``out``.

    Raises ConversionError naming the file, key or tensor that cannot be converted."""
    from tqdm import tqdm

    from phoenix.checkpoint import CheckpointStore
    from phoenix.config import dump_config
    from phoenix.model import build_model
    from phoenix.tokenizer import load_tokenizer

    hf_dir, out = Path(hf_dir), Path(out)
    config_path = hf_dir / "config.json"
    if not hf_dir.exists():
        raise ConversionError(f"{hf_dir}: does not exist")
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    hf = read_hf_config(config_path)
    model = model_from_hf(hf)
    padded = check_layout(model, tp, pp, ep)
    reader = SafetensorsReader(hf_dir)
    shape = shape_of(model)
    _check_tensor_names(reader, shape)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype] if dtype else reader.dtype()
    _check_tokenizer_fits(hf_dir, model["vocab_size"])
    with atomic_output(out) as tmp:
        copied = copy_tokenizer_files(hf_dir, tmp / "tokenizer")
        tokenizer = _tokenizer_section(hf_dir, out, copied)
        cfg = conversion_config(model, tokenizer, out)
        with one_process_runtime(cfg) as layout:
            (gpt,) = build_model(cfg, layout, model["vocab_size"], wrap_ddp=False,
                                 initialize=False, dtype=target)
            state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
            filled = set()

            def put(name: str, tensor: torch.Tensor, source: str) -> None:
                dest = state[name]
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ConversionError(f"tensor {source}: shape {tuple(tensor.shape)} does not "
                                          f"match the config (megatron {name} "
                                          f"{tuple(dest.shape)})")
                dest.copy_(cast(source, tensor, target))
                filled.add(name)

            put(M_EMBED, pad_rows(reader.get(EMBED), padded), EMBED)
            put(M_FINAL_NORM, reader.get(FINAL_NORM), FINAL_NORM)
            if not shape.tied:
                put(M_OUTPUT, pad_rows(reader.get(LM_HEAD), padded), LM_HEAD)
            elif LM_HEAD in reader.names and not torch.equal(reader.get(LM_HEAD), reader.get(EMBED)):
                raise ConversionError(f"tie_word_embeddings is true but {LM_HEAD} differs from "
                                      f"{EMBED}")
            for i in tqdm(range(shape.num_layers), desc="hf-to-phoenix layers", disable=not progress):
                layer = {n: reader.get(n) for n in hf_layer_names(i, shape)}
                for name, tensor in layer_to_megatron(i, layer, shape).items():
                    put(name, tensor, f"model.layers.{i} ({name})")
                del layer
            unfilled = sorted(set(state) - filled)
            if unfilled:
                raise ConversionError(f"megatron weights without an HF source: {unfilled[:5]}")
            manager = CheckpointStore(tmp / "checkpoints", layout.rank, layout.world_size)
            bundle = {"format": 2, "step": 0, "states": {}}
            manager.save(0, [gpt], None, bundle, dump_config(cfg))
        (tmp / "model.yaml").write_text(
            f"# Imported from {hf_dir.resolve()} ({hf['architectures'][0]}) by phoenix convert "
            f"hf-to-phoenix.\n" + yaml.safe_dump(model, sort_keys=False))
        shutil.copyfile(config_path, tmp / "hf_config.json")
        for extra in ("generation_config.json",):
            if (hf_dir / extra).is_file():
                shutil.copyfile(hf_dir / extra, tmp / extra)
        summary = None
        if copied:
            try:
                summary = tokenizer_summary(load_tokenizer(tmp / "tokenizer" if "tokenizer.json"
                                                           in copied else tmp / "tokenizer" / "tokenizer.model"))
                summary["file"] = str(out / "tokenizer")
            except (OSError, ValueError) as e:
                log.warning("hf-to-phoenix: the tokenizer files cannot be read by phoenix: %s", e)
        info = {"source": str(hf_dir.resolve()), "architecture": hf["architectures"][0],
                "dtype": str(target).replace("torch.", ""), "vocab_size": model["vocab_size"],
                "padded_vocab_size": padded, "suggested_parallel": {"tensor": tp, "pipeline": pp, "expert": ep},
                "tokenizer_files": copied, "tokenizer": summary,
                "use": {"checkpoint.init_from": str(out), "model.preset": str(out / "model.yaml"),
                        **{f"tokenizer.{k}": v for k, v in tokenizer.items()}}}
        if "moe" in model:  # a training setting whose meaning differs (phoenix.convert.hf_moe)
            info["moe_note"] = (f"model.moe.aux_loss_coeff {model['moe']['aux_loss_coeff']} is "
                                f"router_aux_loss_coef copied as is; megatron sums its aux loss "
                                f"over the MoE layers and it is 1/top-k of transformers' per "
                                f"layer: coef * top-k / (MoE layers) gives about the same "
                                f"balancing pressure")
            log.warning("hf-to-phoenix: %s", info["moe_note"])
        (tmp / "hf_import.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
