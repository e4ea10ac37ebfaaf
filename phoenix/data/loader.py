"""Global batch -> this DP rank's micro-batches, with background prefetch.

The loader knows only the sample source, batch sizes and ``(dp_rank, dp_size)``. A
global batch ``k`` is the samples ``[k*G, (k+1)*G)`` of the source; it is cut into
micro-batches the way Megatron-LM's pretraining sampler does (within each group of
``micro_batch_size * dp_size`` consecutive samples, rank ``r`` takes the ``r``-th run of
``micro_batch_size``), so every layout trains on the same global batches. Its state is
the number of global batches consumed, so a resume continues at the next sample.

The global batch size may change from step to step (multi-stage recipes): a
:class:`BatchLayout` says where batch ``k`` starts and how many samples it has.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Protocol

import numpy as np
import torch


class SampleSource(Protocol):
    """Random access to training samples by global position (0, 1, 2, ...)."""

    def __len__(self) -> int: ...

    def sample(self, index: int) -> dict[str, np.ndarray | int]: ...


class BatchLayout(Protocol):
    """Where each global batch lies in the sample source."""

    def batch_start(self, step: int) -> int: ...

    def batch_size(self, step: int) -> int: ...

    def samples_before(self, step: int) -> int: ...


class FixedBatches:
    """Every global batch has ``global_batch_size`` samples."""

    def __init__(self, global_batch_size: int):
        self.global_batch_size = global_batch_size

    def batch_start(self, step: int) -> int:
        return step * self.global_batch_size

    def batch_size(self, step: int) -> int:
        return self.global_batch_size

    samples_before = batch_start


def rank_sample_indices(step: int, global_batch_size: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int, base: int | None = None) -> np.ndarray:
    """Global sample positions of ``dp_rank``'s micro-batches at ``step``.

    ``base``: position of the batch's first sample (default ``step * global_batch_size``).
    Returns an int64 array of shape ``(num_micro_batches, micro_batch_size)``.
    """
    per_round = micro_batch_size * dp_size
    num_micro = global_batch_size // per_round
    base = step * global_batch_size if base is None else base
    rounds = base + np.arange(num_micro, dtype=np.int64)[:, None] * per_round
    return rounds + dp_rank * micro_batch_size + np.arange(micro_batch_size, dtype=np.int64)[None, :]


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack per-sample fields into a micro-batch (int fields become 1-D tensors)."""
    return {key: torch.as_tensor(np.stack([np.asarray(s[key]) for s in samples]))
            for key in samples[0]}


class GlobalBatchLoader:
    """Hands out, per optimizer step, this rank's micro-batches of the next global batch.

    Iterable (``for micro_batches in loader``) up to ``num_steps``; ``next_batch()`` is the
    same one step at a time. ``prefetch``: global batches read ahead in one background
    thread (0: read on demand). ``transform``: applied to every collated micro-batch
    (e.g. :class:`~phoenix.data.documents.DocumentInputs`). Its only state is the next step, which the trainer sets
    from its own step on resume (``load_state_dict({"step": step})``).
    """

    def __init__(self, source: SampleSource, batches: BatchLayout | int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_steps: int, prefetch: int = 2,
                 transform: Callable[[dict], dict] | None = None,
                 skip_steps: frozenset[int] = frozenset()):
        self.source = source
        self.skip_steps = skip_steps
        """0-based steps whose global batch is handed out as None, its tokens never read
        (``train.skip_batches``: a batch skipped for bad data must not stop the run)."""
        self.transform = transform  # applied to each collated micro-batch (prefetch thread)
        self.batches = FixedBatches(batches) if isinstance(batches, int) else batches
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_steps = num_steps
        self.step = 0  # next global batch to hand out
        self.prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.step = int(state["step"])

    @property
    def consumed_samples(self) -> int:
        return self.batches.samples_before(self.step)

    # -- reading -------------------------------------------------------------------
    def _load(self, step: int) -> list[dict[str, torch.Tensor]] | None:
        if step in self.skip_steps:
            return None
        positions = rank_sample_indices(step, self.batches.batch_size(step), self.micro_batch_size,
                                        self.dp_rank, self.dp_size, self.batches.batch_start(step))
        micro_batches = [collate([self.source.sample(int(i)) for i in row]) for row in positions]
        if self.transform is not None:
            micro_batches = [self.transform(mb) for mb in micro_batches]
        return micro_batches

    def _worker(self, start: int) -> None:
        for step in range(start, self.num_steps):
            if self._stop.is_set():
                return
            try:
                item = (step, self._load(step), None)
            except BaseException as e:  # surface reader errors in the training thread
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __iter__(self) -> "GlobalBatchLoader":
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        if self.step >= self.num_steps:
            raise StopIteration
        return self.next_batch()

    def next_batch(self) -> list[dict[str, torch.Tensor]] | None:
        """The micro-batches of the next global batch (prefetched in the background); None
        for a step of ``skip_steps``."""
        if self.step >= self.num_steps:
            raise StopIteration(f"data loader exhausted after {self.num_steps} steps")
        if self.prefetch <= 0:
            batch = self._load(self.step)
        else:
            if self._thread is None:
                self._stop.clear()
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._worker, args=(self.step,),
                                                daemon=True, name="phoenix-prefetch")
                self._thread.start()
            step, batch, error = self._queue.get()
            if error is not None:
                raise error
            assert step == self.step, f"prefetch out of order: got {step}, expected {self.step}"
        self.step += 1
        return batch

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread, self._queue = None, None
