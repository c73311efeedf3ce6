"""pass@k: the chance that at least one of k samples, drawn from the n a problem got, is right.

The unbiased estimator of Chen et al. 2021, "Evaluating Large Language Models Trained on Code"
(arXiv:2107.03374, section 2.1): with n samples of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over problems. It is computed as a product, 1 - prod_{i = n-c+1}^{n} (1 - k / i),
which equals the ratio of binomials and never forms the huge ones.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with ``n`` samples, ``c`` of them correct (0 <= c <= n, 1 <= k <= n).

    Raises:
        ValueError: counts out of range (k above n has no unbiased estimate).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as ``(n, c)`` pairs (NaN when there are none)."""
    if not counts:
        return float("nan")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def default_ks(n: int) -> list[int]:
    """The k reported for ``n`` samples per problem: 1, 2, 4, ... up to n, and n itself."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    return ks if ks[-1] == n else [*ks, n]
