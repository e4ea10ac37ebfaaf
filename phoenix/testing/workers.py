"""Functions run inside spawned ranks by the multi-process tests (must be importable)."""

from __future__ import annotations

from phoenix.config import build_config
from phoenix.monitor.base import Callback


class Recorder(Callback):
    """Keeps every step's metrics in memory (tests compare them across layouts)."""

    def __init__(self):
        self.steps = []
        self.saved: list[str] = []
        """The checkpoints the trainer announced saved (``on_checkpoint_saved``), in order."""
        self._groups = None

    def on_checkpoint_saved(self, trainer, path) -> None:
        self.saved.append(path.name)

    def on_before_optimizer_step(self, trainer) -> None:
        # The settings the optimizer step is about to use (resume-contract tests).
        groups = trainer.optimizer.param_groups
        self._groups = {"betas": [tuple(g["betas"]) for g in groups],
                        "eps": [g["eps"] for g in groups],
                        "weight_decay": [g["weight_decay"] for g in groups],
                        "lr": [g["lr"] for g in groups]}

    def on_step_end(self, trainer, metrics) -> None:
        report = trainer.batch_report  # this rank's samples, in training order
        self.steps.append({"step": metrics.step, "loss": metrics.loss,
                           "grad_norm": metrics.grad_norm, "lr": metrics.lr,
                           "consumed_samples": metrics.consumed_samples,
                           "skipped": metrics.skipped, "groups": self._groups,
                           "dataset_ids": report["dataset_id"].tolist() if "dataset_id" in report else None,
                           "sample_ids": report["sample_id"].tolist() if "sample_id" in report else None})


class StepTimer(Recorder):
    """A Recorder that also keeps every step's wall time (``times``, seconds), with the
    previous step's callbacks included (the trainer charges them to the next step)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_step_end(self, trainer, metrics) -> None:
        super().on_step_end(trainer, metrics)
        self.times.append(metrics.step_time + metrics.callbacks_time_prev_step)


def scale_loss_at_step(trainer, step: int, factor: float) -> None:
    """Multiply the per-token losses of optimizer step ``step`` (1-based) by ``factor``
    (NaN to test the non-finite guard, a large number to create a loss spike)."""
    real_step = trainer.forward_step  # set by setup()

    def scaled(data_iterator, model):
        output, loss_fn = real_step(data_iterator, model)
        if trainer.state.step + 1 == step:
            output = output * factor
        return output, loss_fn

    trainer.forward_step = scaled


def train_and_record(config: dict, overrides: list[str] = (), inject_nan_at: int | None = None) -> dict:
    """Train with ``config`` in this rank; return the recorded steps and final state.

    ``inject_nan_at``: make the loss of that step (1-based) NaN, to test the guard.
    """
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    recorder = Recorder()
    trainer = Trainer(cfg, layout)
    trainer.callbacks.append(recorder)
    trainer.setup()
    if inject_nan_at is not None:
        scale_loss_at_step(trainer, inject_nan_at, float("nan"))
    state = trainer.train()
    return {"steps": recorder.steps, "saved": recorder.saved, "step": state.step,
            "consumed_samples": state.consumed_samples, "skipped": state.skipped_steps,
            "stage_starts": dict(state.stage_starts),
            "rank": layout.rank, "layout": layout.describe()}


def train_jobs(config: dict, jobs: list[list[str]]) -> list[dict]:
    """One :func:`train_and_record` per item of ``jobs`` (its overrides), one after the
    other in this process: consecutive jobs on one run directory (restarts, resumes)
    without a process start-up each."""
    return [train_and_record(config, overrides) for overrides in jobs]


def train_with_norms(config: dict, overrides: list[str] = (), norm_interval: int = 1,
                     optimizer_state_norms: int = 0) -> dict:
    """Like :func:`train_and_record`, with exactly one ``NormMonitor(norm_interval)`` and
    one ``OptimizerStateNormMonitor(optimizer_state_norms)`` in the callbacks (none for an
    interval of 0), whatever the trainer's defaults are. In a single process with the
    latter, ``state_norms`` holds the values of
    :class:`~phoenix.testing.optimizer_state.StateNormReference`."""
    from phoenix.runtime import init_runtime
    from phoenix.testing.optimizer_state import install_norm_monitors
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    recorder = Recorder()
    trainer = Trainer(cfg, layout)
    reference = install_norm_monitors(trainer, norm_interval, optimizer_state_norms)
    trainer.callbacks.append(recorder)
    trainer.setup()
    state = trainer.train()
    return {"steps": recorder.steps, "step": state.step, "rank": layout.rank,
            "layout": layout.describe(), "is_logging_rank": layout.is_logging_rank,
            "state_norms": reference.values if reference is not None else None}


class _SpikeRecorder(Recorder):
    """Recorder that also keeps a checksum of this rank's weights after each step and the
    batch report (as rows) of one chosen step."""

    def __init__(self, report_step: int | None):
        super().__init__()
        self.report_step, self.report_rows = report_step, None

    def on_step_end(self, trainer, metrics) -> None:
        import torch

        from phoenix.monitor.spikes import report_rows

        super().on_step_end(trainer, metrics)
        with torch.no_grad():
            self.steps[-1]["param_sum"] = float(sum(p.detach().double().abs().sum()
                                                    for chunk in trainer.model
                                                    for p in chunk.parameters()))
        if metrics.step == self.report_step:
            self.report_rows = report_rows(trainer.batch_report)


def train_with_spike(config: dict, spikes: dict, overrides: list[str] = (),
                     spike_at: int | None = None, factor: float = 20.0,
                     norm_interval: int = 1) -> dict:
    """Train with a :class:`~phoenix.monitor.spikes.SpikeMonitor` (config ``spikes``, a
    ``SpikeConfig`` as a dict) and a ``NormMonitor``; the loss of step ``spike_at``
    (1-based) is multiplied by ``factor`` (the per-token losses are scaled before the
    loss function, so per-sample losses and gradients scale with it).

    Returns the recorded steps (with ``param_sum``), this rank's batch report rows of
    ``spike_at``, the spike records written by this rank and the final state.
    """
    from phoenix.monitor.norms import NormMonitor
    from phoenix.config.monitoring import SpikeConfig
    from phoenix.monitor.spikes import SpikeMonitor
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    trainer = Trainer(cfg, layout)
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, SpikeMonitor)]
    if norm_interval and not any(isinstance(cb, NormMonitor) for cb in trainer.callbacks):
        trainer.callbacks.append(NormMonitor(norm_interval))
    monitor = SpikeMonitor(SpikeConfig(**spikes), cfg.output_dir)
    recorder = _SpikeRecorder(spike_at)
    trainer.callbacks += [monitor, recorder]
    trainer.setup()
    if spike_at is not None:
        scale_loss_at_step(trainer, spike_at, factor)
    state = trainer.train()
    return {"steps": recorder.steps, "report_rows": recorder.report_rows,
            "records": monitor.records, "count": monitor.count, "step": state.step,
            "skipped": state.skipped_steps, "rank": layout.rank,
            "is_logging_rank": layout.is_logging_rank, "layout": layout.describe()}


def train_runs_with_spikes(jobs: list[tuple]) -> list[dict]:
    """:func:`train_with_spike` for each item of ``jobs`` (its arguments, a tuple), one
    run after the other in this process: several runs without a process start-up each."""
    return [train_with_spike(*job) for job in jobs]


# -- held-out evaluation (tests/eval/test_eval.py) ------------------------------------------
def train_with_eval(config: dict, overrides: list[str] = (), eval_section: dict | None = None,
                    direct_reference: bool = False, cli_argv: list[str] | None = None) -> dict:
    """Train with ``config``; with ``eval_section`` (an ``eval`` config mapping) exactly one
    :class:`~phoenix.eval.EvalCallback` evaluates, else none does (whatever the trainer's
    defaults are). Returns the losses and every evaluation's results (plain dicts).

    After training, in the same process: ``direct_reference`` computes the eval metrics
    directly in plain torch from the full logits of the trained ``GPTModel`` (the same
    weights as the end-of-training evaluation), and ``cli_argv`` runs ``phoenix eval
    ARGV`` (it builds a fresh model and loads the weights from the saved checkpoint; it
    ends the runtime, so it comes last)."""
    from phoenix.config.typed import from_dict
    from phoenix.eval.callback import EvalCallback
    from phoenix.config.eval import EvalConfig
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    trainer = Trainer(cfg, layout)
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, EvalCallback)]
    evaluator = None
    if eval_section is not None:
        evaluator = EvalCallback(from_dict(EvalConfig, eval_section, "eval"))
        trainer.callbacks.append(evaluator)
    trainer.setup()
    trainer.train()
    evals = [] if evaluator is None else [
        (step, {name: r.to_dict() for name, r in results.items()})
        for step, results in evaluator.history]
    needle = [] if evaluator is None else [(step, r.to_dict())
                                            for step, r in evaluator.needle_history]
    result = {"losses": list(trainer.losses), "evals": evals, "needle": needle,
              "rank": layout.rank, "layout": layout.describe()}
    if direct_reference:
        result["direct"] = direct_eval_metrics(trainer.model[0].module, cfg, evaluator.cfg)
    if cli_argv is not None:
        import contextlib
        import io

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            result["cli_rc"] = run_eval_cli(cli_argv)
        result["cli_stdout"] = stdout.getvalue()
    return result


def direct_eval_metrics(gpt, cfg, eval_cfg) -> dict:
    """The eval metrics of ``gpt`` (a single-process ``GPTModel``) computed directly in
    plain torch from its full logits: the reference for :class:`phoenix.eval.Evaluator`."""
    import numpy as np
    import torch

    from phoenix.data.samples import SampleReader, build_sample_index
    from phoenix.eval.metrics import token_stats
    from phoenix.tokenizer import load_tokenizer, model_vocab_size

    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab = model_vocab_size(cfg, tokenizer)
    was_training = gpt.training
    gpt.eval()
    direct = {}
    for s in eval_cfg.sets:
        index = build_sample_index(s.prefix, cfg.data.seq_length, use_groups=False)
        reader = SampleReader(index, tokenizer.eod_id)
        m = min(eval_cfg.max_samples, len(index))
        samples = [reader.read(int(i)) for i in np.arange(m) * len(index) // m]
        tokens = torch.as_tensor(np.stack([x["tokens"] for x in samples]))
        labels = torch.as_tensor(np.stack([x["labels"] for x in samples]))
        mask = torch.as_tensor(np.stack([x["loss_mask"] for x in samples])) > 0
        positions = torch.as_tensor(np.stack([x["position_ids"] for x in samples]))
        with torch.no_grad():
            logits = gpt(tokens, positions, attention_mask=None).double()  # [b, s, padded]
        direct[s.display_name] = _direct_metrics(logits, labels, mask, vocab)
        # Padding ids: the model's logits there are -inf already; boost them anyway (logits
        # from elsewhere) to check that token_stats excludes them from loss and top-k.
        boosted = logits.clone()
        boosted[..., vocab:] += 100.0
        stats = token_stats(boosted.float(), labels, mask.float(), vocab).tolist()
        direct[s.display_name]["boosted"] = {
            "direct": _direct_metrics(boosted, labels, mask, vocab),
            "token_stats": {"loss": stats[0] / stats[1], "tokens": int(stats[1]),
                            "top1": stats[2] / stats[1], "top5": stats[3] / stats[1]}}
    gpt.train(was_training)
    return direct


def _direct_metrics(logits, labels, mask, vocab: int) -> dict:
    """Plain torch: loss and top-k over the real ids only (as the exported HF model)."""
    import torch

    real = logits.clone()
    real[..., vocab:] = float("-inf")  # padding ids are never predictions
    token_loss = -torch.log_softmax(real, dim=-1).gather(-1, labels[..., None])[..., 0]
    top1 = real.argmax(dim=-1) == labels
    top5 = (real.topk(5, dim=-1).indices == labels[..., None]).any(dim=-1)
    n = int(mask.sum())
    return {"loss": float(token_loss[mask].sum()) / n, "tokens": n,
            "top1": int(top1[mask].sum()) / n, "top5": int(top5[mask].sum()) / n,
            "padded_vocab": logits.size(-1), "vocab": vocab}


def run_eval_cli(argv: list[str]) -> int:
    """``phoenix eval ARGV`` in this rank; returns its exit status."""
    from phoenix.cli import COMMANDS

    if "eval" in COMMANDS:  # wired into the ``phoenix`` command
        from phoenix.cli import main
        return main(["eval", *argv])
    from phoenix.eval.run import main

    return main(argv)


# -- per-dataset loss / throughput monitors (tests/monitor/test_dataset_loss.py) ---------------
class WeightSnapshots(Callback):
    """Copies of this rank's weights before every step (``snapshots[k]``: the weights
    step ``k + 1`` trained from), for oracles that replay a step with a plain forward."""

    def __init__(self):
        self.snapshots = []

    @staticmethod
    def _copy(trainer) -> dict:
        module = trainer.model[0]
        while hasattr(module, "module"):
            module = module.module
        return {k: v.detach().clone() if hasattr(v, "detach") else v
                for k, v in module.state_dict().items()}

    def on_train_start(self, trainer) -> None:
        self.snapshots = [self._copy(trainer)]

    def on_step_end(self, trainer, metrics) -> None:
        self.snapshots.append(self._copy(trainer))


def per_dataset_loss_oracle(trainer, snapshots: list[dict], steps: int) -> list[dict]:
    """Replay each global batch through a plain forward from the weights it trained at
    (single process, one pipeline stage) and compute, independently of the loss function
    and ``batch_report``: ``[{name: (loss_sum, loss_tokens)}]`` per step (float64 cross
    entropy over the full padded logits; datasets absent from a batch are left out)."""
    import torch

    from phoenix.data.loader import collate

    cfg = trainer.cfg
    names = [e.display_name for e in cfg.data.datasets]
    module = trainer.model[0]
    while hasattr(module, "module"):
        module = module.module
    G = cfg.train.global_batch_size
    out = []
    with torch.no_grad():
        for k in range(steps):
            module.load_state_dict(snapshots[k])
            batch = collate([trainer.loader.source.sample(i) for i in range(k * G, (k + 1) * G)])
            logits = module(batch["tokens"], batch["position_ids"], attention_mask=None)
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll = -logp.gather(-1, batch["labels"].long().unsqueeze(-1)).squeeze(-1)
            mask = batch["loss_mask"].double()
            per = {}
            for d, loss_sum, tokens in zip(batch["dataset_id"].tolist(), (nll * mask).sum(1).tolist(),
                                           mask.sum(1).tolist()):
                s, t = per.get(names[d], (0.0, 0.0))
                per[names[d]] = (s + loss_sum, t + tokens)
            out.append({n: v for n, v in per.items() if v[1] > 0})
    return out


def train_with_dataset_monitors(config: dict, overrides: list[str] = (), interval: int = 1,
                                oracle: bool = False, peak_tflops: float | None = None) -> dict:
    """Train with a ``DatasetLossMonitor`` and a ``ThroughputMonitor`` (every ``interval``
    steps; the trainer's NormMonitor removed to save time). ``oracle`` (single process):
    also return :func:`per_dataset_loss_oracle` of every step. Returns the recorded steps,
    the monitor's (collective) ``state_dict()`` and the layout."""
    from phoenix.monitor.dataset_loss import DatasetLossMonitor
    from phoenix.monitor.norms import NormMonitor
    from phoenix.monitor.throughput import ThroughputMonitor
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    recorder, snapshots = Recorder(), WeightSnapshots()
    trainer = Trainer(cfg, layout)
    monitor = DatasetLossMonitor(interval)
    # Exactly one of each monitor, whatever the trainer's defaults become.
    trainer.callbacks = [cb for cb in trainer.callbacks
                         if not isinstance(cb, (NormMonitor, DatasetLossMonitor, ThroughputMonitor))]
    trainer.callbacks += [monitor, ThroughputMonitor(interval, peak_tflops=peak_tflops), recorder]
    if oracle:
        trainer.callbacks.append(snapshots)
    trainer.setup()
    state = trainer.train()
    result = {"steps": recorder.steps, "step": state.step, "rank": layout.rank,
              "layout": layout.describe(), "is_logging_rank": layout.is_logging_rank,
              "dataset_state": monitor.state_dict(), "last": monitor.last}
    if oracle:
        result["oracle"] = per_dataset_loss_oracle(trainer, snapshots.snapshots, state.step)
    return result


def optimizer_state_after_setup(config: dict, overrides: list[str] = ()) -> dict:
    """Set a trainer up (resume / init_from included) without training; return the sum
    of |Adam moments| over this rank's optimizer state and the first param group's LR."""
    import torch

    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    trainer = Trainer(cfg, layout, callbacks=[])
    trainer.setup()
    total = torch.zeros(2, dtype=torch.float64, device=layout.device)
    opt = trainer.optimizer
    for inner in [getattr(o, "optimizer", None) for o in getattr(opt, "chained_optimizers", [opt])]:
        for state in (inner.state.values() if inner is not None else []):
            if "exp_avg" in state:
                total += torch.stack([state["exp_avg"].abs().sum(),
                                      state["exp_avg_sq"].abs().sum()]).double()
    torch.distributed.all_reduce(total)
    return {"exp_avg": total[0].item(), "exp_avg_sq": total[1].item(),
            "step": trainer.state.step, "lr": trainer.optimizer.param_groups[0]["lr"]}


# -- MoE routing monitor (tests/monitor/test_moe_monitor.py) --------------------------------
def train_with_moe_monitor(config: dict, overrides: list[str] = (), moe_interval: int = 1,
                           norm_interval: int = 1, optimizer_state_norms: int = 0) -> dict:
    """Train with exactly one ``MoEMonitor(moe_interval)`` and the norm monitors of
    :func:`~phoenix.testing.optimizer_state.install_norm_monitors` (none for an interval
    of 0), whatever the trainer's defaults are. Returns the recorded steps, the monitor's
    last tags and the layout."""
    from phoenix.monitor.moe import MoEMonitor
    from phoenix.runtime import init_runtime
    from phoenix.testing.optimizer_state import install_norm_monitors
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    recorder = Recorder()
    trainer = Trainer(cfg, layout)
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, MoEMonitor)]
    monitor = MoEMonitor(moe_interval) if moe_interval else None
    if monitor is not None:
        trainer.callbacks.append(monitor)
    reference = install_norm_monitors(trainer, norm_interval, optimizer_state_norms)
    trainer.callbacks.append(recorder)
    trainer.setup()
    state = trainer.train()
    return {"steps": recorder.steps, "step": state.step, "rank": layout.rank,
            "layout": layout.describe(), "is_logging_rank": layout.is_logging_rank,
            "moe_last": monitor.last if monitor is not None else None,
            "state_norms": reference.values if reference is not None else None}


def train_jobs_with_moe_losses(config: dict, jobs: list[list[str]]) -> list[dict]:
    """Like :func:`train_jobs` (fresh runs one after the other in this process, each with
    ``jobs[i]``'s overrides; ``config`` must save no checkpoint), each step also recording
    the ``moe/aux_loss`` and ``moe/z_loss`` of one ``MoEMonitor(1)`` (None for a dense
    model, or off the logging rank), and ``checkpointed``: how many times megatron's
    ``CheckpointFunction`` ran a forward (0 without recomputation)."""
    from megatron.core.tensor_parallel import random as mrandom

    from phoenix.monitor.moe import MoEMonitor
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    calls = [0]
    forward = mrandom.CheckpointFunction.forward

    def counted(ctx, *args):
        calls[0] += 1
        return forward(ctx, *args)

    mrandom.CheckpointFunction.forward = staticmethod(counted)
    out = []
    for overrides in jobs:
        calls[0] = 0
        cfg = build_config(config, overrides)
        layout = init_runtime(cfg)
        recorder = Recorder()
        trainer = Trainer(cfg, layout)
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, MoEMonitor)]
        monitor = MoEMonitor(1) if cfg.model.moe is not None else None

        class Losses(Recorder):
            def on_step_end(self, trainer, metrics) -> None:
                tags = (monitor.last if monitor is not None else None) or {}
                recorder.steps[-1].update(aux_loss=tags.get("moe/aux_loss"),
                                          z_loss=tags.get("moe/z_loss"))

        trainer.callbacks += [cb for cb in (monitor, recorder, Losses()) if cb is not None]
        trainer.setup()
        trainer.train()
        out.append({"steps": recorder.steps, "rank": layout.rank, "layout": layout.describe(),
                    "checkpointed": calls[0]})
    mrandom.CheckpointFunction.forward = forward
    return out
