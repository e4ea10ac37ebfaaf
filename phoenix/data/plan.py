"""Group-aware blended data plan: which (dataset, sample) pairs every global batch holds.

A plan covers one training stage of ``K`` global batches of ``B`` samples. The heavy
lifting is C++ (``phoenix.data._plan_cpp``, sources in ``csrc/``, loaded by
:mod:`phoenix.data.native`); this module holds the plan's types and turns a stage's inputs
into the exact integers the builder consumes, with its parts: the input checks
(:mod:`phoenix.data.plan_checks`), the per-batch counts (:mod:`phoenix.data.plan_counts`)
and the whole groups (:mod:`phoenix.data.plan_groups`). Plans on disk:
:mod:`phoenix.data.plan_io`.
``phoenix.testing.plan_reference`` re-implements the same algorithm in plain Python and the
tests require both to agree bit for bit.

Algorithm (all arithmetic is exact: shares are integers in units of ``Q = 2**60``,
computed from the weights as float64, see :func:`phoenix.data.plan_counts.normalised`)
--------------------------------------------------------------------------------------
1. *Bursts.* A dataset with ``0 < w < min_share`` appears with ``s = max(round(min_share
   * B), ceil(w * B))`` samples in a fraction ``w * B / s`` of the batches (the rate from
   the exact weight, in units of ``1/Q``; Bresenham with phase 1/2, so appearances are
   evenly spaced and the first ``K`` batches hold ``round(K * w * B / s)`` of them: the
   cumulative count stays within ``s / 2`` of ``w * B * K``), and in no other batch.
   Batch ``k`` has ``F_k = B - (burst samples in k)`` free slots.
2. *Exact mixture.* Every other dataset ``d`` has the fluid target ``a[k,d] = F_k * v_d``
   with ``v_d = w_d / W_free``. It gets ``floor(a[k,d])`` plus 0 or 1 "extra"; the
   ``F_k - sum floor`` extras of a batch go to the datasets chosen by PD^2, the optimal
   Pfair scheduler (Srinivasan & Anderson: earliest pseudo-deadline, then successor bit,
   then group deadline; ties by dataset index) applied to the fractional parts. Pfair
   keeps each lag strictly inside (-1, 1): for every prefix ``K'``,
   ``|sum_{k<K'} c[k,d] - sum_{k<K'} a[k,d]| < 1``, and ``c[k,d]`` is ``floor`` or
   ``ceil`` of ``a[k,d]``. Without bursts (constant ``F``) this is PD^2's optimality
   theorem. With bursts the windows vary over time, where PD^2 is not guaranteed (in
   random tests it fails for ~1 burst configuration in 10^3-10^4), so the builder checks the
   lag after every batch and, if PD^2 failed anywhere, redoes the allocation with
   cumulative EDF: sample ``j`` of ``d`` is released in the batch where ``sum a[.,d]``
   first exceeds ``j-1`` and due in the one where it reaches ``j``; EDF is optimal for
   unit jobs and a feasible assignment exists (the fluid one), so the prefix bound holds
   again, per-batch counts then within 2 of ``a[k,d]`` (``DataPlan.allocator == "edf"``).
   PD^2 deadlines further than ``HORIZON`` batches ahead count as infinite.
3. *Epoch streams.* Dataset ``d`` is consumed from the stream ``epoch * N_d + position``:
   epoch ``e`` is a random permutation of its samples (or, for grouped datasets, of its
   groups, each group's samples kept in order) that is a pure function of
   ``(seed, dataset name, e)``: a 4-round Feistel network on ``[0, a) x [0, b)``
   (``a = ceil(sqrt(N))``, ``b = ceil(N / a)``) with modular addition, splitmix64-filled
   round tables and cycle walking. It needs O(sqrt(N)) memory, gives O(1) random access
   and no division for consecutive positions. Every sample is used once before any is
   used again. ``start_offsets`` / ``end_offsets`` are stream positions, so a stage
   continues exactly where the previous one stopped.
4. *Whole groups* (``group_mode="batch"``). *Flexible* (the default, whenever another
   blended dataset without groups can absorb the difference and no batch has fixed
   counts): the grouped dataset ``g`` (share ``v`` of the free slots) takes its groups
   strictly in stream order against its cumulative target ``T_k = v * sum_{m<=k} F_m``
   (``FlexPacker`` in ``csrc/data_plan.h``). A group *fits* batch ``k`` when its size is
   at most ``ceil(v * F_k)``; a fitting group is taken whole iff ``C + size/2 <= T_k``
   (``C`` = samples taken so far) and it fits the slots left in the batch, else the
   batch closes and it comes first in the next one. So every fitting group lands whole
   in one batch (always), and while the batch has room (``v * F + S <= F``, ``S`` the
   largest group ``<= ceil(v * B)``; ``prepare`` logs when this may fail)
   ``-S/2 < C - T_k <= max(S, 1)/2`` after every batch, ``v`` being the share as the
   plan holds it (the quota, a multiple of ``2**-60``): against the written weights'
   exact share both ends move by up to ``2**-60 * sum F``, so ``-S/2`` itself can be
   reached (tests/data/test_flex_prefix_edge.py). A larger group starts once
   ``round(T_k - C) >= 1`` and takes ``round(T_k - C)`` samples per batch (at least one
   while ``v * F_k >= 1``: consecutive batches). The flexible datasets are packed first,
   in dataset order; the allocator (step 2) then plans the others on the slots left,
   ``F_k - flexible counts``, with their quotas renormalised over themselves, so they stay
   within 1 of their share of those slots. *Exact* (no such dataset, or a mixture
   warmup): groups are packed into the dataset's exact per-batch counts: a group that is started continues first (a group larger than the
   count spans consecutive batches); then the oldest looked-ahead groups (up to
   ``GROUP_WINDOW``, never across an epoch boundary) that fill the count exactly, chosen
   by a subset-sum DP preferring older groups; if no exact fill exists, the largest fill
   plus a split of the oldest leftover group (``groups_split``). Near the end of the
   stage, once the looked-ahead groups would not fit in the rest of the stage, packing
   switches to draining them first and then taking groups in order, so every stage ends
   with a prefix of the stream consumed (a single offset describes it).
5. *Interleave.* Within a batch, sources are listed dataset by dataset (groups
   contiguous) and source ``j`` goes to position ``P(j mod 2^a) * m + (j >> a) * s mod m``
   where ``B = 2^a * m`` (m odd), ``P`` reverses the ``a`` bits and complements the other
   bits for odd ``j`` and ``s`` is a stride coprime to ``m``. So sources ``2i, 2i+1``
   land in different halves/quarters/... and differ in every position bit: with the
   contiguous rank layout (``rank_slice`` default) any dataset or group with >= 2 samples
   in a batch spans >= 2 ranks whenever ``dp_size`` is a power of two dividing ``2^a``;
   with Megatron's micro-batch layout (``micro_batch_size``, as
   ``phoenix.data.loader.rank_sample_indices``) and ``B`` a power of two, any with >= 3.

Memory: the plan stores a uint16 dataset id and an int64 sample id per sample (10 B),
like Megatron's blending index; nothing per sample lives in Python objects. On disk it is
a directory of ``.npy`` files that every rank memory-maps (``phoenix.data.plan_io``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from phoenix.data.native import plan_cpp
from phoenix.data.plan_checks import check_inputs
from phoenix.data.plan_counts import Q_BITS, shares
from phoenix.data.plan_groups import check_groups, digest_of_starts, groups_digest
from phoenix.data.stream_recut import apply_head, dataset_key

log = logging.getLogger(__name__)

FORMAT_VERSION = 3          # 3: stored as a directory of .npy files (phoenix.data.plan_io)
HORIZON = 1 << 16        # batches of look-ahead for PD^2 deadlines
GROUP_WINDOW = 32        # groups considered at once when packing a batch


@dataclass
class PlanDataset:
    """One dataset of a stage.

    ``num_samples``: samples (of ``seq_length`` tokens) in its sample-level index.
    ``weight``: share of the stage's samples: the stage table's exact ``Fraction``, or a
    number; rounded to float64 and normalised to sum to 1 where the quotas are computed
    (:func:`phoenix.data.plan_counts.normalised`).
    ``min_share``: 0 = off; else a dataset with ``weight < min_share`` appears only in
    bursts of ``round(min_share * B)`` samples (see module doc). ``group_mode="batch"``
    keeps every group of ``group_ids`` (one id per sample, groups contiguous) inside one
    global batch where possible.
    """

    name: str
    num_samples: int
    weight: Fraction | float
    min_share: float = 0.0
    group_mode: str = "none"
    group_ids: np.ndarray | None = None
    groups_digest: str | None = None
    """:func:`groups_digest` of ``group_ids`` when already known (the cached sample index
    stores it): the plan's fingerprint then needs no pass over the ids at start-up."""
    pack_groups: int = 0
    """The sample index's ``pack_groups`` (``group_ids`` are then units of groups of at
    most this many samples, each kept whole like a group): validated against the fit limit."""


@dataclass
class PlanInputs:
    """A stage: datasets, global batch size ``B``, number of global batches ``K``, seed,
    stream offsets carried from the previous stage (default 0) and whether to interleave."""

    datasets: list[PlanDataset]
    global_batch_size: int
    num_batches: int
    seed: int
    start_offsets: list[int] | None = None
    interleave: bool = True
    fixed_counts: np.ndarray | None = None
    """(K0, D) per-batch counts for the first ``K0 <= K`` batches, given by the caller
    (a mixture warmup: see :func:`phoenix.data.plan_counts.mixture_warmup_counts`); each row
    sums to ``B``. The allocator plans the remaining batches from the weights, bursts starting at K0."""
    heads: list | None = None
    """Per dataset, None or the :class:`phoenix.data.stream_recut.StreamHead` of a stream
    re-cut or reseeded in mid-epoch: the plan then gives that epoch's positions the
    remainder's ids (see :func:`phoenix.data.stream_recut.apply_head`)."""
    stream_seed: int | None = None
    """The seed of the ungrouped datasets' sample order when it is not ``seed`` (a stage's
    ``data_seed``): their ids are those of streams permuted with it (``seed`` still
    places the samples in the batches). None: ``seed``."""


@dataclass
class DataPlan:
    """A built plan. Sample ``i = k * B + j`` of the stage is
    ``(dataset_ids[i], sample_ids[i])``; shapes: ``dataset_ids``/``sample_ids`` (K*B,),
    ``counts`` (K, D) int32 with rows summing to B, per-dataset arrays (D,)."""

    names: list[str]
    weights: np.ndarray          # normalised, float64 (D,)
    num_samples: np.ndarray      # int64 (D,)
    burst: np.ndarray            # bool (D,): appears in bursts (min_share)
    global_batch_size: int
    num_batches: int
    dataset_ids: np.ndarray      # uint16 (K*B,)
    sample_ids: np.ndarray       # int64 (K*B,)
    counts: np.ndarray           # int32 (K, D)
    start_offsets: np.ndarray    # int64 (D,): stream positions at stage start
    end_offsets: np.ndarray      # int64 (D,): stream positions at stage end
    epochs: np.ndarray           # int64 (D,): epochs this stage drew samples from
    groups_split: np.ndarray     # int64 (D,): groups started here that span > 1 batch
    groups_total: np.ndarray     # int64 (D,): groups started in this stage
    groups_fit: np.ndarray       # int64 (D,): of those, groups that fit (size <= fit limit)
    groups_fit_split: np.ndarray  # int64 (D,): fitting groups split anyway (0 when flexible)
    flexible: np.ndarray         # bool (D,): grouped dataset whose per-batch count follows its groups
    violations: int = 0          # (batch, dataset) lag checks failed; 0 unless a bug
    allocator: str = "pd2"       # "pd2", or "edf" when the fallback was needed (bursts only)
    fingerprint: str = ""
    build_seconds: dict | None = None   # wall time of the build phases (not saved)

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset_ids, sample_ids) of global batch ``k``, each of shape (B,)."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} out of range [0, {self.num_batches})")
        B = self.global_batch_size
        return self.dataset_ids[k * B:(k + 1) * B], self.sample_ids[k * B:(k + 1) * B]

    @property
    def free_slots(self) -> np.ndarray:
        """F_k: slots per batch left to the non-burst datasets, int64 (K,)."""
        return self.global_batch_size - self.counts[:, self.burst].sum(axis=1, dtype=np.int64)

    def summary(self) -> list[dict]:
        """One dict per dataset: weight, samples used, epochs, batches present, per-batch
        min/max count, groups started (``groups_total``), those that fit a batch
        (``groups_fitting``: size <= the fit limit of the batch where they start, see the
        module doc) and the fitting ones kept whole in one batch (``groups_kept_whole``)."""
        rows = []
        for d, name in enumerate(self.names):
            col = self.counts[:, d]
            used = int(col.sum())
            total, fit = int(self.groups_total[d]), int(self.groups_fit[d])
            rows.append(dict(
                name=name, weight=float(self.weights[d]), burst=bool(self.burst[d]),
                samples_used=used,
                epochs=int(self.epochs[d]),
                epochs_consumed=used / int(self.num_samples[d]) if self.num_samples[d] else 0.0,
                batches_present=int((col > 0).sum()),
                min_per_batch=int(col.min()) if len(col) else 0,
                max_per_batch=int(col.max()) if len(col) else 0,
                groups_total=total, groups_fitting=fit,
                groups_kept_whole=fit - int(self.groups_fit_split[d]),
                flexible=bool(self.flexible[d]),
            ))
        return rows


def rank_slice(plan: DataPlan, k: int, dp_rank: int, dp_size: int,
               micro_batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The samples of batch ``k`` that data-parallel rank ``dp_rank`` trains on.

    ``micro_batch_size=None``: rank r takes the contiguous slice ``[r*B/dp, (r+1)*B/dp)``.
    Otherwise the Megatron layout of ``phoenix.data.loader.rank_sample_indices``: in each
    run of ``micro_batch_size * dp_size`` samples rank r takes the r-th
    ``micro_batch_size``. Returns (dataset_ids, sample_ids) in training order.
    """
    B = plan.global_batch_size
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size={dp_size})")
    mbs = B // dp_size if micro_batch_size is None else micro_batch_size
    if mbs < 1 or B % (mbs * dp_size):
        raise ValueError(f"global batch {B} is not a multiple of micro_batch_size {mbs} * dp_size {dp_size}")
    per_round = mbs * dp_size
    rounds = np.arange(B // per_round, dtype=np.int64)[:, None] * per_round
    idx = (rounds + dp_rank * mbs + np.arange(mbs, dtype=np.int64)[None, :]).ravel()
    ds, ss = plan.batch(k)
    return ds[idx], ss[idx]


# ---------------------------------------------------------------------- preparing
def prepare(inputs: PlanInputs, *, horizon: int = HORIZON, window: int = GROUP_WINDOW) -> dict:
    """Validate ``inputs`` and turn them into the exact integers the builders consume:
    the fields (:func:`~phoenix.data.plan_checks.check_inputs`), the mixture's shares
    (:func:`~phoenix.data.plan_counts.shares`), the groups
    (:func:`~phoenix.data.plan_groups.check_groups`).

    Raises ValueError naming the dataset and field for every invalid input.
    """
    fixed = check_inputs(inputs)
    ds, B, K = inputs.datasets, inputs.global_batch_size, inputs.num_batches
    mix = shares(ds, B, fixed_batches=len(fixed))
    group_starts = check_groups(ds, mix, K, fixed)
    start = list(inputs.start_offsets) if inputs.start_offsets is not None else [0] * len(ds)
    names = [d.name for d in ds]
    keys = [dataset_key(n) for n in names]
    return dict(
        names=names, weights=np.array([float(x) for x in mix.weights]),
        burst=np.array(mix.burst, dtype=bool),
        num_samples=np.array([int(d.num_samples) for d in ds], dtype=np.int64),
        keys=np.array(keys, dtype=np.uint64), kind=np.array(mix.kind, dtype=np.int64),
        quota=np.array(mix.quota, dtype=np.int64), burst_size=np.array(mix.size, dtype=np.int64),
        start=np.array([int(s) for s in start], dtype=np.int64), group_starts=group_starts,
        global_batch_size=int(B), num_batches=int(K), seed=int(inputs.seed),
        interleave=bool(inputs.interleave), horizon=int(horizon), window=int(window),
        fixed_counts=fixed, flexible=np.array([k == 2 for k in mix.kind], dtype=bool),
    )


# -------------------------------------------------------------------------- building
def plan_fingerprint(inputs: PlanInputs, *, horizon: int = HORIZON, window: int = GROUP_WINDOW) -> str:
    """sha256 of a canonical serialisation of every input and the format version: the
    cache key of a plan on disk. Groups enter through their boundaries (what the plan
    depends on), not their ids."""
    digests = [(d.groups_digest or groups_digest(d.group_ids))
               if d.group_mode == "batch" and d.group_ids is not None else None
               for d in inputs.datasets]
    return _fingerprint(inputs, digests, horizon, window)


def _fingerprint(inputs: PlanInputs, digests: list, horizon: int, window: int) -> str:
    datasets = []
    for d, gid in zip(inputs.datasets, digests):
        datasets.append(dict(name=d.name, num_samples=int(d.num_samples), weight=float(d.weight).hex(),
                             min_share=float(d.min_share).hex(), group_mode=d.group_mode, groups=gid))
    doc = dict(format=FORMAT_VERSION, q_bits=Q_BITS, horizon=horizon, window=window,
               datasets=datasets, global_batch_size=int(inputs.global_batch_size),
               num_batches=int(inputs.num_batches), seed=int(inputs.seed),
               start_offsets=None if inputs.start_offsets is None else [int(s) for s in inputs.start_offsets],
               interleave=bool(inputs.interleave))
    if inputs.heads is not None and any(h is not None for h in inputs.heads):
        doc["heads"] = [None if h is None else h.key() for h in inputs.heads]
    if inputs.stream_seed is not None and inputs.stream_seed != inputs.seed:
        doc["stream_seed"] = int(inputs.stream_seed)
    if inputs.fixed_counts is not None and len(inputs.fixed_counts):
        doc["fixed_counts"] = hashlib.sha256(np.ascontiguousarray(inputs.fixed_counts, dtype="<i4")
                                             .tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def build_plan(inputs: PlanInputs, *, threads: int | None = None, horizon: int = HORIZON,
               window: int = GROUP_WINDOW) -> DataPlan:
    """Validate ``inputs`` and build the stage's plan with the C++ builder.

    The result does not depend on ``threads`` (nor on any data-parallel size).
    """
    t0 = time.perf_counter()
    prep = prepare(inputs, horizon=horizon, window=window)
    t1 = time.perf_counter()
    threads = threads or min(os.cpu_count() or 1, 8)
    out = plan_cpp().build(prep["num_samples"], prep["keys"], prep["kind"], prep["quota"],
                          prep["burst_size"], prep["start"], prep["group_starts"],
                          prep["global_batch_size"], prep["num_batches"], prep["seed"],
                          prep["interleave"], prep["horizon"], prep["window"], threads,
                          prep["fixed_counts"])
    if out["pending_left"]:
        raise RuntimeError("data plan: a grouped dataset ended the stage with groups pending (bug)")
    if out["violations"]:
        raise RuntimeError(f"data plan: {out['violations']} mixture lag checks failed (bug)")
    if out["allocator"] != "pd2":
        log.info("data plan: PD^2 could not keep per-batch counts within 1 of the target with "
                 "these bursts; used the EDF allocator (prefix bound kept, per-batch within 2)")
    stream_seed = inputs.seed if inputs.stream_seed is None else inputs.stream_seed
    for d, head in enumerate(inputs.heads or [None] * len(inputs.datasets)):
        # A stream re-cut or reseeded in mid-epoch reads its remainder first; a stream of
        # another seed has other ids (whole-group datasets keep ``seed``: not reseeded).
        reseeded = stream_seed != inputs.seed and inputs.datasets[d].group_mode != "batch"
        if (head is not None or reseeded) and prep["num_samples"][d]:
            apply_head(out["dataset_ids"], out["sample_ids"], d, int(prep["num_samples"][d]),
                       head, int(prep["start"][d]), int(stream_seed), prep["names"][d])
    digests = [None if st is None else digest_of_starts(st) for st in prep["group_starts"]]
    plan = _to_plan(prep, out, _fingerprint(inputs, digests, horizon, window))
    plan.build_seconds = dict(prepare=t1 - t0, allocate=out["allocate_s"], fill=out["fill_s"],
                              total=time.perf_counter() - t0)
    return plan


def _to_plan(prep: dict, out: dict, fingerprint: str) -> DataPlan:
    return DataPlan(
        names=prep["names"], weights=prep["weights"], num_samples=prep["num_samples"],
        burst=prep["burst"], global_batch_size=prep["global_batch_size"],
        num_batches=prep["num_batches"], dataset_ids=out["dataset_ids"],
        sample_ids=out["sample_ids"], counts=out["counts"], start_offsets=prep["start"],
        end_offsets=out["end_offsets"], epochs=out["epochs"], groups_split=out["groups_split"],
        groups_total=out["groups_total"], groups_fit=out["groups_fit"],
        groups_fit_split=out["groups_fit_split"], flexible=prep["flexible"],
        violations=int(out["violations"]),
        allocator=str(out["allocator"]), fingerprint=fingerprint)
