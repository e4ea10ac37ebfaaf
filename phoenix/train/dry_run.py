"""``phoenix train --dry-run``: every check the real start makes before allocating a
model, without a process group: the layout for the world it would run on, the installed
packages, where the run starts from (resume verdicts, ``init_from`` vocabulary and
shapes), then the resolved config on stdout and the size summary on stderr."""

from __future__ import annotations

import os
import sys

from phoenix.checkpoint import plan_restore
from phoenix.config import ConfigError, dump_config
from phoenix.runtime.capabilities import check_capabilities
from phoenix.runtime.world_fit import smallest_world


def dry_run_world(cfg) -> int:
    """``$WORLD_SIZE`` when set (a dry run of a given launch), else the smallest world the
    layout fits, as ``phoenix describe`` takes it."""
    return int(os.environ.get("WORLD_SIZE", 0)) or smallest_world(cfg.parallel)


def init_from_shapes(source, cfg, vocab_size: int | None) -> None:
    """Compare the ``init_from`` checkpoint's global tensor shapes (its metadata: nothing
    is loaded) with the model this run would build: layers, hidden size, FFN width and
    vocabulary rows. The real start compares every weight once the model exists; this
    finds the usual mismatches before anything is allocated."""
    from torch.distributed.checkpoint import FileSystemReader

    from phoenix.model.builder import padded_vocab_size

    meta = FileSystemReader(str(source)).read_metadata().state_dict_metadata
    shapes = {k: tuple(m.size) for k, m in meta.items()
              if hasattr(m, "size") and not k.startswith("optimizer")}
    m = cfg.model
    theirs, mine = {}, {}
    proj = shapes.get("decoder.layers.self_attention.linear_proj.weight")
    if proj is not None and len(proj) == 3:  # stacked over layers: (layers, hidden, heads*dim)
        theirs["layers"], mine["layers"] = proj[0], m.num_layers
        theirs["hidden_size"], mine["hidden_size"] = proj[1], m.hidden_size
    fc2 = shapes.get("decoder.layers.mlp.linear_fc2.weight")
    if fc2 is not None and len(fc2) == 3 and m.moe is None:
        theirs["ffn_hidden_size"], mine["ffn_hidden_size"] = fc2[2], m.ffn_hidden_size
    emb = shapes.get("embedding.word_embeddings.weight")
    if emb is not None and vocab_size is not None:
        rows = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, cfg.parallel.tensor)
        theirs["vocabulary rows"], mine["vocabulary rows"] = emb[0], rows
    differ = [f"{k} {theirs[k]} in the checkpoint, {mine[k]} in this run's model"
              for k in theirs if theirs[k] != mine[k]]
    if differ:
        raise ConfigError(f"checkpoint.init_from: the model config does not match checkpoint "
                          f"{source}: {'; '.join(differ)} (compare model.* with "
                          f"{source / 'config.yaml'})")


def dry_run(cfg) -> int:
    from phoenix.train.describe import describe, format_description, vocab_size_of

    world = dry_run_world(cfg)
    cfg.validate_layout(world)
    check_capabilities(cfg)
    vocab = vocab_size_of(cfg)
    # Where the run would start from, and (resuming) whether the checkpoint's run allows
    # every config change: the same refusals as the real start.
    restore = plan_restore(cfg)
    if restore.kind == "init_from":
        init_from_shapes(restore.path, cfg, vocab)
    print(dump_config(cfg), end="")
    if vocab is None:
        print("# size and memory: unknown vocabulary (set model.vocab_size)", file=sys.stderr)
    else:
        summary = format_description(describe(cfg, world, vocab))
        print("".join(f"# {line}\n" for line in summary.splitlines()), end="", file=sys.stderr)
    if restore.kind != "fresh":
        print(f"# would {restore.kind.replace('_', ' ')} {restore.path}"
              + "".join(f"\n# honoured change: {c}" for c in restore.honoured)
              + "".join(f"\n# data change (implicit stage boundary): {c}"
                        for c in restore.data_changed), file=sys.stderr)
    return 0
