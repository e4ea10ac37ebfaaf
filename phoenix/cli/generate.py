"""``phoenix generate CHECKPOINT --prompt TEXT [k=v ...]``: continue prompts with a checkpoint.

CHECKPOINT is a ``step_*`` folder, a run folder (its latest checkpoint), or a folder
written by ``phoenix convert hf-to-phoenix`` / ``expand-vocab`` / ``upcycle``. The model,
tokenizer and the RoPE the weights were last trained with come from the checkpoint's own
``config.yaml``; ``k=v`` overrides apply on top (e.g. ``runtime.device=cpu``,
``tokenizer.model=...``).

The layout defaults to one pipeline stage with tensor parallelism over every process
(``parallel.tensor`` = WORLD_SIZE; run under ``phoenix torchrun --nproc-per-node N`` for
TP=N), whatever layout trained the checkpoint (checkpoints reshard). Decoding is
:class:`phoenix.eval.decoding.Decoder`: megatron-core's KV cache, greedy at
``--temperature 0`` (the default), else sampled with top-k / top-p from ``--seed``.
Generation stops at ``--max-new-tokens`` or at the tokenizer's end of document (unless
``--ignore-eos``). Rank 0 prints each prompt's continuation (``--json``: one JSON object
per prompt with the prompt, its token ids, the new ids and the text).

Exit status: 0, or 2 on a config or checkpoint error (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_LAYOUT = ("parallel.pipeline=1", "parallel.virtual_pipeline=null", "parallel.context=1",
                  "parallel.expert=1",
                  "parallel.expert_tensor=null", "parallel.sequence_parallel=false",
                  "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false",
                  "train.micro_batch_size=1", "train.global_batch_size=1",
                  "checkpoint.init_from=null", "logging.tensorboard=false")
"""What ``phoenix generate`` sets before the user's overrides: one stage, TP over every
process, no training-only machinery (the batch sizes only keep the config valid)."""


def generation_config(path, overrides=()):
    """The RunConfig to generate from checkpoint ``path``: its ``config.yaml`` with
    :data:`DEFAULT_LAYOUT`, ``parallel.tensor`` = WORLD_SIZE and then ``overrides``."""
    from phoenix.config.loader import load_saved_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return load_saved_config(path / "config.yaml",
                             [*DEFAULT_LAYOUT, f"parallel.tensor={world}", *overrides])


def generate_text(checkpoint, prompts: list[str], params, overrides=(), kv_cache=None,
                  stop_at_eod: bool = True) -> list[dict]:
    """Collective: load ``checkpoint`` on this rank's layout and continue each prompt
    (text) with :class:`~phoenix.eval.decoding.SamplingParams` ``params``, whose stop ids
    get the tokenizer's end of document with ``stop_at_eod``. Returns per prompt
    ``{"prompt", "prompt_ids", "new_ids", "text"}``."""
    import dataclasses

    from phoenix.checkpoint import load_model
    from phoenix.checkpoint.store import resolve_checkpoint
    from phoenix.eval.decoding import Decoder
    from phoenix.runtime import init_runtime
    from phoenix.tokenizer import load_tokenizer, model_vocab_size

    path = resolve_checkpoint(checkpoint)
    cfg = generation_config(path, overrides)
    tokenizer = load_tokenizer(cfg.tokenizer)
    if stop_at_eod:
        params = dataclasses.replace(params, stop_ids=(*params.stop_ids, tokenizer.eod_id))
    ids = [tokenizer.encode(p) for p in prompts]
    layout = init_runtime(cfg)
    vocab_size = model_vocab_size(cfg, tokenizer)
    model = load_model(path, cfg, layout, vocab_size=vocab_size)
    new = Decoder(model, layout, min(vocab_size, tokenizer.vocab_size),
                  kv_cache=kv_cache).generate(ids, params)
    return [{"prompt": p, "prompt_ids": x, "new_ids": n, "text": tokenizer.decode(n)}
            for p, x, n in zip(prompts, ids, new)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="phoenix generate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue text prompts with a checkpoint (KV-cached decoding; greedy by "
                    "default). Launch under phoenix torchrun for tensor parallelism.",
        epilog="examples:\n"
               "  phoenix generate runs/quickstart --prompt 'def add(a, b):' --max-new-tokens 32\n"
               "  phoenix generate runs/quickstart --prompt 'Once' --temperature 0.8 --top-p 0.9 --seed 1\n"
               "  phoenix torchrun --nproc-per-node 2 -m phoenix.cli generate runs/quickstart --prompt 'Once'")
    parser.add_argument("checkpoint", help="checkpoint directory (step_*), a run directory, or an "
                                           "hf-to-phoenix output folder")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. runtime.device=cpu")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", default=None,
                        help="a text file with one prompt per line (added to --prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no limit (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="do not stop at the tokenizer's end of document")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="recompute the whole sequence for every token (a reference)")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    args = parser.parse_intermixed_args(argv)

    from phoenix.checkpoint.store import CheckpointError
    from phoenix.config import ConfigError
    from phoenix.runtime.command import run_command, setup_logging

    setup_logging()
    result = {}

    def body():
        from phoenix.eval.decoding import SamplingParams

        prompts = list(args.prompt)
        if args.prompt_file:
            try:
                with open(args.prompt_file, encoding="utf-8") as f:
                    prompts += [line.rstrip("\n") for line in f if line.strip()]
            except OSError as e:
                raise ConfigError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
        if not prompts:
            raise ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
        try:
            params = SamplingParams(max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed)
        except ConfigError as e:
            raise ConfigError(f"--{str(e).split(':')[0].replace('_', '-')}:"
                              f"{str(e).split(':', 1)[1]}") from None
        result["out"] = generate_text(args.checkpoint, prompts, params, args.overrides,
                                      kv_cache=False if args.no_kv_cache else None,
                                      stop_at_eod=not args.ignore_eos)

    code = run_command(body, (CheckpointError,))
    if code:
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        for item in result["out"]:
            if args.json:
                print(json.dumps(item, ensure_ascii=False), flush=True)
            else:
                print(f"{item['prompt']}{item['text']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
