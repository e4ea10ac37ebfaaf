"""Read a checkpoint's tensors back in one plain process (no phoenix, no megatron): the
independent view tests compare runs with."""

from __future__ import annotations

from pathlib import Path

import torch


def read_checkpoint_tensors(path: str | Path, *, model_only: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a dist_checkpointing checkpoint directory, by key (global shapes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(path)).read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in md.state_dict_metadata.items()
          if hasattr(m, "size") and not (model_only and k.startswith("optimizer"))}
    dcp.load(sd, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return sd
