"""Read back what W&B wrote in offline mode: the ``run-<id>.wandb`` transaction log.

The file is W&B's record log: a 7-byte header (``:W&B``, a 2-byte magic, a version
byte), then blocks of 32 KiB holding LevelDB-log records (CRC32, little-endian 2-byte
length, a type: full / first / middle / last; a block tail under 7 bytes is padding),
each payload a ``wandb_internal_pb2.Record`` protobuf. The wandb package ships the
protobuf classes but no reader, so the tests read it here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER, BLOCK, RECORD_HEADER = 7, 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list:
    """The ``Record`` protobufs of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B record log")
    records, pos, pending = [], HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER:  # the block's padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        payload = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(run_dir: str | Path) -> dict[int, dict]:
    """Step -> ``{key: value}`` of every ``run.log`` of every W&B run folder below
    ``run_dir`` (values decoded from JSON; images and histograms are dicts)."""
    out: dict[int, dict] = {}
    for path in sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb")):
        for record in read_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                   for item in record.history.item}
            step = row.pop("_step", record.history.step.num)
            out.setdefault(int(step), {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")})
    return out


def run_ids(run_dir: str | Path) -> list[str]:
    """The W&B run id of each offline run folder below ``run_dir`` (one per job)."""
    return [p.name.rsplit("-", 1)[-1] for p in sorted(Path(run_dir).rglob("offline-run-*"))]


def config(run_dir: str | Path) -> dict:
    """The W&B run config of the first run folder below ``run_dir`` (the run record's
    config, then any later config updates)."""
    out: dict = {}
    for path in sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"))[:1]:
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            items = (record.run.config.update if kind == "run"
                     else record.config.update if kind == "config" else [])
            for item in items:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    out.pop("_wandb", None)
    return out
