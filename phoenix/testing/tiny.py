"""A tiny corpus, tokenizer, tokenised prefix and config: for tests and smoke runs.

Everything is generated locally (no downloads) and cached per directory, so a test
session builds it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phoenix.config import RunConfig, build_config


@dataclass(frozen=True)
class TinyData:
    tokenizer_model: str
    prefixes: dict[str, str]
    """Dataset name -> ``.bin/.idx`` prefix."""


def make_tiny_data(root: str | Path, num_docs: int = 300, vocab_size: int = 512) -> TinyData:
    """Synthetic corpora, a sentencepiece model (trained on web + code), and the
    tokenised prefixes: ``web``, ``code``, ``math`` and ``repos`` (code grouped by
    repository: ``repos.groups.npy``)."""
    from phoenix.data.preprocess import preprocess
    from phoenix.data.synthetic import write_corpus
    from phoenix.tokenizer import train_sentencepiece

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpora = {"web": ("web", 1), "code": ("code", 2)}
    for name, (domain, seed) in corpora.items():
        path = root / f"{name}.jsonl"
        if not path.exists():
            write_corpus(path, num_docs, seed, domain=domain)
    model = root / "tokenizer.model"
    if not model.exists():
        train_sentencepiece([str(root / f"{n}.jsonl") for n in corpora], str(root / "tokenizer"),
                            vocab_size)
    extra = {"math": dict(domain="math", seed=3, group_key=None),
             "repos": dict(domain="code", seed=4, group_key="repo")}
    for name, kw in extra.items():
        path = root / f"{name}.jsonl"
        if not path.exists():
            # Small repositories (1-3 short files), so whole groups fit a tiny stage.
            write_corpus(path, num_docs, kw["seed"], domain=kw["domain"], group_key=kw["group_key"],
                         docs_per_group=(1, 3), max_words=80)
    prefixes = {}
    for name in [*corpora, *extra]:
        prefix = root / name
        if not Path(str(prefix) + ".idx").exists():
            group_key = extra.get(name, {}).get("group_key")
            preprocess([str(root / f"{name}.jsonl")], str(prefix), str(model), name=name,
                       group_key=group_key)
        prefixes[name] = str(prefix)
    return TinyData(str(model), prefixes)


def tiny_config_dict(files: TinyData, output_dir: str | Path, **sections) -> dict:
    """Plain config data for a tiny fp32 CPU run; ``sections`` update top-level sections."""
    cfg = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "runtime": {"device": "cpu"},
        "model": {"preset": "tiny"},
        "tokenizer": {"model": files.tokenizer_model},
        "data": {"seq_length": 64, "prefetch_batches": 0,
                 "datasets": [{"prefix": files.prefixes["web"], "weight": 0.7, "name": "web"},
                              {"prefix": files.prefixes["code"], "weight": 0.3, "name": "code"}]},
        "train": {"steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "seed": 1234},
        "optim": {"warmup_steps": 2, "lr": 3.0e-3},
        "checkpoint": {"save_at_end": False},
        "logging": {"log_interval": 1, "tensorboard": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def tiny_config(files: TinyData, output_dir: str | Path, overrides=(), **sections) -> RunConfig:
    return build_config(tiny_config_dict(files, output_dir, **sections), overrides)
