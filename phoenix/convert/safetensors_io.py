"""Lazy reading and sharded writing of Hugging Face safetensors checkpoints.

A checkpoint is one ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file). Tensors are
read one at a time through ``safe_open`` (memory-mapped): converting a layer never holds
more than that layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from phoenix.convert.common import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_FLOATS = {torch.float32, torch.bfloat16, torch.float16}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class SafetensorsReader:
    """The tensors of an HF folder by name, read lazily; validates the index up front."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        elif single.is_file():
            weight_map = None
        else:
            raise ConversionError(f"{self.folder}: no {SINGLE} and no {INDEX} (only safetensors "
                                  f"checkpoints are read; convert .bin files first)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise ConversionError(f"{index}: shard(s) {missing} are missing from {self.folder}")
        self._handles = {f: safe_open(str(self.folder / f), framework="pt") for f in files}
        self._where: dict[str, str] = {}
        for f, handle in self._handles.items():
            for name in handle.keys():
                self._where[name] = f
        if weight_map is not None:
            wrong = sorted(n for n, f in weight_map.items() if self._where.get(n) != f)
            unlisted = sorted(set(self._where) - set(weight_map))
            if wrong or unlisted:
                shown = (wrong + unlisted)[:5]
                raise ConversionError(f"{index}: does not match the shards ({len(wrong)} tensor(s) "
                                      f"not in the shard the index names, {len(unlisted)} not "
                                      f"listed; e.g. {shown})")

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``; a missing one is refused by name."""
        if name not in self._where:
            raise ConversionError(f"{self.folder}: tensor {name} is missing")
        tensor = self._handles[self._where[name]].get_tensor(name)
        if tensor.dtype not in _FLOATS:
            raise ConversionError(f"{self.folder}: tensor {name} has dtype {tensor.dtype}; only "
                                  f"float32/bfloat16/float16 checkpoints convert (quantized "
                                  f"weights are not supported)")
        return tensor

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first tensor (what a conversion keeps by default)."""
        return self.get(min(self._where)).dtype


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``; refuses values the target cannot hold (e.g. > 65504 in fp16)."""
    out = tensor.to(dtype)
    if out.dtype != tensor.dtype and not torch.isfinite(out).all() and torch.isfinite(tensor).all():
        raise ConversionError(f"tensor {name}: its values (max |x| "
                              f"{tensor.abs().max().item():.4g}) do not fit {dtype}; choose a "
                              f"wider --dtype")
    return out


class ShardWriter:
    """Writes tensors into ``model-0000k-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own) and the index; shards are renamed to their final names at
    :meth:`close`, once their count is known."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_bytes = folder, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for k, (tmp, names) in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
