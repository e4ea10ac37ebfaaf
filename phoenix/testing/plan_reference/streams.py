"""The reference's sample streams: epoch permutations (splitmix64, Fisher-Yates, Feistel)
and the plain consumption of an ungrouped dataset (see :mod:`phoenix.data.plan`,
"Epoch streams")."""

from __future__ import annotations

import math

import numpy as np

M64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """splitmix64 finaliser (bijective 64-bit mix)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def splitmix64(state: int, n: int) -> list[int]:
    """The next ``n`` outputs of a splitmix64 generator started at ``state``."""
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        out.append(mix64(state))
    return out


def epoch_key(seed: int, key: int, epoch: int) -> int:
    return mix64(mix64(mix64(seed & M64) ^ key) ^ epoch)


SMALL_PERM = 1 << 16


def permutation(n: int, key: int, x: np.ndarray) -> np.ndarray:
    """Image of positions ``x`` under the epoch permutation of ``range(n)`` (n >= 1):
    Fisher-Yates up to SMALL_PERM elements, the Feistel network beyond."""
    if n > SMALL_PERM:
        return feistel(n, key, x)
    perm = list(range(n))
    for i, v in zip(range(n - 1, 0, -1), splitmix64(key, n - 1)):
        j = (v * (i + 1)) >> 64
        perm[i], perm[j] = perm[j], perm[i]
    return np.array(perm, dtype=np.int64)[np.asarray(x, dtype=np.int64)]


def feistel(n: int, key: int, x: np.ndarray) -> np.ndarray:
    """Image of positions ``x`` under the epoch permutation of ``range(n)`` (n >= 1):
    4 Feistel rounds on [0, a) x [0, b), a = ceil(sqrt(n)), b = ceil(n / a)."""
    a = math.isqrt(n - 1) + 1
    b = -(-n // a)
    vals = iter(splitmix64(key, 2 * (a + b)))
    tabs = [np.array([(next(vals) * mod) >> 64 for _ in range(size)], dtype=np.int64)
            for size, mod in ((b, a), (a, b), (b, a), (a, b))]

    def once(v):
        left, right = v // b, v % b
        left = (left + tabs[0][right]) % a
        right = (right + tabs[1][left]) % b
        left = (left + tabs[2][right]) % a
        right = (right + tabs[3][left]) % b
        return left * b + right

    y = once(np.asarray(x, dtype=np.int64).copy())
    while (bad := y >= n).any():  # cycle walking keeps the map a bijection of range(n)
        y[bad] = once(y[bad])
    return y



def consume_plain(n, seed, key, start, total):
    """Sample ids of stream positions [start, start + total) of an ungrouped dataset."""
    pos = np.arange(start, start + total, dtype=np.int64)
    out = np.empty(total, dtype=np.int64)
    for e in np.unique(pos // n) if total else []:
        m = pos // n == e
        out[m] = permutation(n, epoch_key(seed, key, int(e)), pos[m] % n)
    epochs = len(np.unique(pos // n)) if total else 0
    return out, epochs

