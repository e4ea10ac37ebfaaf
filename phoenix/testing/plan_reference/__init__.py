"""Straightforward Python/numpy reference of the data-plan builder (used by tests only).

It implements the algorithm documented in :mod:`phoenix.data.plan` step by step, with
Python integers for all exact arithmetic, so that tests can check that the C++ builder
(``csrc/data_plan.cpp``) produces bit-identical plans. It is slow; keep inputs small.
Inputs are the *prepared* integers of :func:`phoenix.data.plan.prepare`.

The parts import one another in one direction: ``streams`` (epoch permutations) and
``allocation`` (per-batch counts) at the bottom, the packers ``groups`` and ``flex`` on
them, and ``build`` (the whole plan) on top.
"""

from phoenix.testing.plan_reference.allocation import Q, Q_BITS, allocate, burst_free, fit_limit
from phoenix.testing.plan_reference.build import build, interleave_positions
from phoenix.testing.plan_reference.streams import (SMALL_PERM, consume_plain, epoch_key,
                                                    feistel, permutation)

__all__ = ["Q", "Q_BITS", "SMALL_PERM", "allocate", "build", "burst_free", "consume_plain",
           "epoch_key", "feistel", "fit_limit", "interleave_positions", "permutation"]
