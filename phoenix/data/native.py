"""The compiled data-plan extension ``phoenix.data._plan_cpp`` (sources in ``csrc/``).

Loaded here and nowhere else (megatron's ``helpers_cpp`` / ``helpers.py`` pattern): the
C++ does the tight loops, the Python modules around it validate and explain. There is
no slow fallback, so a missing or broken build fails loudly instead of changing speed
silently.
"""

from __future__ import annotations

import numpy as np


def plan_cpp():
    """The compiled plan builder (``phoenix.data._plan_cpp``)."""
    try:
        from phoenix.data import _plan_cpp
    except ImportError as e:
        raise RuntimeError(f"the C++ data-plan builder phoenix.data._plan_cpp is not built or does "
                           f"not load ({e}); build it with `pip install -e .` or "
                           f"`python setup.py build_ext --inplace`") from None
    return _plan_cpp


def group_runs(ids: np.ndarray) -> tuple[np.ndarray, bool]:
    """(start of every run of equal ids plus len(ids) as int64 (G+1,), run ids increase)."""
    ids = np.asarray(ids)
    if ids.dtype not in (np.int64, np.int32):
        ids = ids.astype(np.int64)
    return plan_cpp().group_starts(np.ascontiguousarray(ids))
