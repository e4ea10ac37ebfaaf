"""What import and export share: the error type, the one-process run that builds the
GPTModel, the layout checks, atomic output folders and the tokenizer files.

Conversions go through megatron-core's own ``GPTModel`` and phoenix's checkpoint manager at
TP = PP = 1 on the cpu device (a world of one process), so the checkpoint format is the one
training writes and reads, and ``checkpoint.init_from`` reshards it to any TP/PP.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from phoenix.config import RunConfig, build_config
from phoenix.model.builder import padded_vocab_size
from phoenix.io import atomic_output_dir

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file, key or tensor."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")


def conversion_config(model: dict, tokenizer: dict, output_dir: str | Path) -> RunConfig:
    """A one-process cpu RunConfig around the ``model`` section (data and training keys
    are placeholders: a conversion reads no data and trains no step)."""
    seq = min(int(model["max_seq_length"]), 8)
    return build_config({
        "name": "convert", "output_dir": str(output_dir), "model": model,
        "tokenizer": tokenizer, "runtime": {"device": "cpu"},
        "data": {"seq_length": seq, "datasets": [{"prefix": "none", "name": "none"}]},
        "train": {"steps": 1, "global_batch_size": 1, "precision": "fp32"},
        "optim": {"lr": 1.0e-4}, "checkpoint": {"resume": False, "save_at_end": False},
        "logging": {"tensorboard": False},
    })


def check_layout(model: dict, tp: int, pp: int, ep: int = 1) -> int:
    """Refuse a suggested TP/PP/EP the checkpoint could not be loaded at; returns the padded
    vocabulary (rows of the embedding and output layer)."""
    padded = padded_vocab_size(model["vocab_size"], model.get("make_vocab_size_divisible_by", 128), 1)
    heads, groups = model["num_attention_heads"], model.get("num_query_groups") or model["num_attention_heads"]
    problems = [f"{what} {n} is not divisible by --tp {tp}" for what, n in (
        ("num_attention_heads", heads), ("num_query_groups (num_key_value_heads)", groups),
        ("padded vocab size", padded), ("ffn_hidden_size", model["ffn_hidden_size"])) if n % tp]
    if model["num_layers"] % pp:
        problems.append(f"num_layers {model['num_layers']} is not divisible by --pp {pp}")
    moe = model.get("moe")
    if moe:  # experts split over EP whole, their width over ETP (= TP by default)
        f = moe.get("ffn_hidden_size") or model["ffn_hidden_size"]
        shared = moe.get("shared_expert_intermediate_size")
        problems += [f"{what} {n} is not divisible by --{flag} {k}" for what, n, flag, k in (
            ("num_experts", moe["num_experts"], "ep", ep), ("expert ffn_hidden_size", f, "tp", tp),
            ("shared_expert_intermediate_size", shared or 0, "tp", tp)) if k >= 1 and n % k]
    elif ep != 1:
        problems.append(f"--ep {ep}: a dense model has no experts")
    if tp < 1 or pp < 1 or ep < 1:
        problems.append("--tp, --pp and --ep must be >= 1")
    if problems:
        raise ConversionError("; ".join(problems))
    return padded


def atomic_output(out: str | Path):
    """:func:`phoenix.io.atomic_output_dir` with a ConversionError when ``out`` exists."""
    return atomic_output_dir(out, ConversionError)


@contextlib.contextmanager
def one_process_runtime(cfg: RunConfig):
    """init_runtime for a world of one (torchrun's variables default to it); torn down
    afterwards unless the caller had already started torch.distributed (a test harness)."""
    import torch.distributed as dist

    from phoenix.runtime import init_runtime, shutdown_runtime

    started_here = not dist.is_initialized()
    layout = init_runtime(cfg)
    if layout.world_size != 1:
        raise ConversionError(f"conversion runs in one process, not {layout.world_size}; run it "
                              f"without torchrun")
    try:
        yield layout
    finally:
        if started_here:
            shutdown_runtime()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of an HF folder verbatim; returns their names."""
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return names


def tokenizer_summary(tokenizer) -> dict:
    """What the exported/imported folder records of a tokenizer."""
    return {"file": tokenizer.model_file, "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "eod_id": tokenizer.eod_id, "pad_id": tokenizer.pad_id}
