"""Sampling strategies: which principal kernels each client trains (docs/algorithm.md §2).

A strategy turns a layer's singular values into ``k = ceil(keep_ratio · r)`` kernel indices and their frozen
multipliers ``ω``. `sample` applies it to every principal layer of a factorized model and returns a `Selection`,
the value that `extract`, `merge`, the per-kernel aggregation, the TFF distributor and the exporter consume.

Strategies (``strategy=``):
- ``prism``: PriSM's importance sampling, ``p_i ∝ s_i^γ`` drawn sequentially without replacement (§3), ω = 1.
- ``top``: deterministic top-k by singular value (FedHM), ω = 1.
- ``uniform``: k of r uniformly, ω = 1.
- ``unbiased``: inclusion probabilities ``π_i = min(1, c·s_i)`` (Korzhenkov & Louizos 2024, Eq. 5 / Alg. 1),
  drawn by conditional Poisson sampling with exactly these marginals, ``ω_i = 1/π_i`` (Horvitz–Thompson).
- ``collective``: ``π_i = clip((c·s_i − 1)/(C − 1), 0, 1)`` for ``C`` clients per round (Eq. 8 / Alg. 2),
  ``ω_i = C / (1 + (C − 1)·π_i)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from prism_tf import streams
from prism_tf.kinds import kernel_groups
from prism_tf.plan import SubmodelPlan
from prism_tf.streams import SeedLike

STRATEGIES = ("prism", "top", "uniform", "unbiased", "collective")


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """One layer's share of a client's sub-model: kernel indices (sorted), their ω, and the layer's full rank."""

    indices: np.ndarray
    scale: np.ndarray
    rank: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", np.asarray(self.indices, dtype=np.int32))
        object.__setattr__(self, "scale", np.asarray(self.scale, dtype=np.float32))

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])


@dataclasses.dataclass(frozen=True)
class Selection:
    """What one client trains this round (docs/algorithm.md §2: the currency of a round).

    ``layers``: per principal layer, the kept kernels. ``channels``: per sliced channel group (`prism_tf.plan`),
    the kept output channels, for PriSM's memory-efficient variant and the width-sliced baselines; groups not
    named here are kept whole.
    """

    layers: Mapping[str, LayerSelection]
    keep_ratio: float
    strategy: str
    channels: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready description (`from_dict` inverts it exactly: indices, ω as float32, ranks, channels)."""
        return {
            "keep_ratio": float(self.keep_ratio), "strategy": self.strategy,
            "layers": {name: {"indices": sel.indices.tolist(), "scale": sel.scale.tolist(), "rank": int(sel.rank)}
                       for name, sel in sorted(self.layers.items())},
            "channels": {name: np.asarray(idx, np.int32).tolist() for name, idx in sorted(self.channels.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Selection:
        """The `Selection` that `to_dict` described.

        Raises:
          ValueError: a field is missing or malformed (naming it).
        """
        try:
            layers = {str(name): LayerSelection(np.asarray(v["indices"], np.int64), np.asarray(v["scale"], np.float64),
                                                int(v["rank"]))
                      for name, v in data["layers"].items()}
            channels = {str(name): np.asarray(v, np.int32) for name, v in data.get("channels", {}).items()}
            selection = cls(layers, float(data["keep_ratio"]), str(data["strategy"]), channels)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a selection: {type(e).__name__}: {e}") from None
        for name, sel in selection.layers.items():
            if sel.indices.ndim != 1 or sel.scale.shape != sel.indices.shape:
                raise ValueError(f"selection for layer '{name}': indices and scale must be equal-length lists")
            if sel.size and (sel.indices.min() < 0 or sel.indices.max() >= sel.rank):
                raise ValueError(f"selection for layer '{name}' has indices outside [0, {sel.rank})")
        return selection

    def sizes(self) -> dict[str, int]:
        """Number of kept kernels per layer (the sub-model's ranks)."""
        return {name: sel.size for name, sel in self.layers.items()}

    def indices(self) -> dict[str, np.ndarray]:
        """Kept indices per group (kernel groups by layer name, then channel groups)."""
        out = {name: sel.indices for name, sel in self.layers.items()}
        out.update({name: np.asarray(idx, np.int32) for name, idx in self.channels.items()})
        return out

    def check_model(self, model: tf.keras.Model, plan: SubmodelPlan | None = None) -> None:
        """Raise ``ValueError`` naming the layer if this selection does not fit ``model``."""
        if self.channels:
            plan = plan or SubmodelPlan.of(model)
            for name, idx in self.channels.items():
                group = plan.groups.get(name)
                if group is None or group.kind != "channels" or not group.free:
                    raise ValueError(f"selection slices channel group '{name}', which '{model.name}' cannot slice")
                idx = np.asarray(idx)
                if idx.size == 0 or idx.min() < 0 or idx.max() >= group.size:
                    raise ValueError(f"selection for channel group '{name}' has indices outside [0, {group.size})")
        ranks = {group: layer.pair_rank(pair) for group, (layer, pair) in kernel_groups(model).items()}
        for name in ranks.keys() - self.layers.keys():
            raise ValueError(f"selection has no entry for principal layer '{name}' of model '{model.name}'")
        for name, sel in self.layers.items():
            if name not in ranks:
                raise ValueError(f"selection names layer '{name}', which is not a principal layer of '{model.name}'")
            if sel.rank != ranks[name]:
                raise ValueError(
                    f"selection for layer '{name}' was drawn for rank {sel.rank}, the model's layer has rank "
                    f"{ranks[name]}: the selection comes from another model"
                )
            if sel.size and (sel.indices.min() < 0 or sel.indices.max() >= sel.rank):
                raise ValueError(f"selection for layer '{name}' has indices outside [0, {sel.rank})")


def num_kept(keep_ratio: float, rank: int) -> int:
    """``k = ceil(keep_ratio · r)``, at least 1 (docs/algorithm.md §2); tolerant of float round-off (0.3·10 -> 3)."""
    check_keep_ratio(keep_ratio)
    return max(1, min(rank, math.ceil(keep_ratio * rank - 1e-9)))


def check_keep_ratio(keep_ratio: float, what: str = "keep_ratio") -> None:
    if not (isinstance(keep_ratio, int | float | np.floating) and 0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(f"{what} must be in (0, 1], got {keep_ratio!r}")


def default_gamma(keep_ratio: float) -> float:
    """PriSM's exponent: γ = 4 for keep ≤ 0.2, else 2.5 (docs/algorithm.md §2)."""
    return 4.0 if keep_ratio <= 0.2 else 2.5


def sample(
    model: tf.keras.Model,
    keep_ratio: float,
    seed: SeedLike = 0,
    strategy: str = "prism",
    *,
    gamma: float | None = None,
    clients_per_round: int | None = None,
    output_keep: float | None = None,
    output_rule: str = "random",
) -> Selection:
    """Draw one client's `Selection` over every principal layer of ``model`` (docs/algorithm.md §2).

    Layers are sampled independently, each from its own named stream (`prism_tf.streams`). ``seed`` may be a
    sequence such as ``(run_seed, round, client)`` so that every client of every round draws independently and
    reproducibly; the result equals `prism_tf.federated.methods.Method.select` for the same seed (one code path,
    `sample_from_singular_values`).

    Args:
      model: a factorized model (`prism_tf.factorize`).
      keep_ratio: fraction of each layer's kernels to keep, in (0, 1]; may differ per client.
      seed: int, sequence of ints or ``np.random.SeedSequence``.
      strategy: one of `STRATEGIES`.
      gamma: PriSM's exponent (default `default_gamma`).
      clients_per_round: ``C`` for ``collective`` (required there).
      output_keep: PriSM's memory-efficient variant (docs/algorithm.md §2): also keep only this fraction of the output
        channels of every principal layer whose outputs feed a single next layer (not a residual add), so the
        sub-model's intermediate feature maps shrink. ``None`` keeps all channels.
      output_rule: ``"random"`` (uniform per client and layer, the default) or ``"first"`` (the first
        channels, the authors' 2023 rule).
    """
    groups = kernel_groups(model)
    if not groups:
        raise ValueError(f"sample: model '{model.name}' has no principal-kernel layer; call prism_tf.factorize first")
    singular_values = {group: layer.factors(pair).singular_values.numpy() for group, (layer, pair) in groups.items()}
    return sample_from_singular_values(
        singular_values, keep_ratio, seed, strategy, gamma=gamma, clients_per_round=clients_per_round,
        plan=SubmodelPlan.of(model) if output_keep is not None else None, output_keep=output_keep,
        output_rule=output_rule, model_name=model.name)


def output_channels(
    plan: SubmodelPlan, output_keep: float, rule: str, seed: SeedLike, model_name: str = "model"
) -> dict[str, np.ndarray]:
    """The memory-efficient variant's channels (README, "Use it from Python"): per owned output group,
    ``ceil(keep · C)`` channels.

    Group ``g`` draws from the named stream ``(seed, "channels", g)`` (`prism_tf.streams`).
    """
    check_keep_ratio(output_keep, "output_keep")
    groups = sorted(plan.owned_channel_groups().values())
    if not groups:
        raise ValueError(f"output_keep: model '{model_name}' has no principal layer whose outputs can be sliced")
    return channel_selection(plan, groups, output_keep, rule, seed)


def channel_selection(
    plan: SubmodelPlan, groups: Sequence[str], keep: float, rule: str, seed: SeedLike
) -> dict[str, np.ndarray]:
    """`channel_subset` of every group in ``groups``, group ``g`` from its own stream ``(seed, "channels", g)``."""
    return {g: channel_subset(plan.groups[g].size, keep, rule, streams.rng(seed, streams.CHANNELS, g)) for g in groups}


def channel_subset(size: int, keep: float, rule: str, rng: np.random.Generator) -> np.ndarray:
    """``ceil(keep · size)`` sorted channel indices: the first ones (``"first"``) or uniformly drawn (``"random"``)."""
    n = num_kept(keep, size)
    if rule == "first":
        return np.arange(n, dtype=np.int32)
    if rule == "random":
        return np.sort(rng.choice(size, n, replace=False)).astype(np.int32)
    raise ValueError(f"unknown channel rule {rule!r}; choose 'first' or 'random'")


def rolling_window(size: int, keep: float, round_index: int) -> np.ndarray:
    """FedRolex's rolling sub-model extraction (Alam et al., NeurIPS 2022): ``n = ceil(keep · size)`` channels starting
    at ``round_index mod size`` and wrapping around, returned sorted.

    The window advances by one channel per round, so over ``size`` consecutive rounds every channel is kept
    exactly ``n`` times. (The authors' code, ``torch.roll(arange(C), t mod C)[:n]``, rolls the same window the other
    way, start ``(−t) mod C``: the same coverage.)
    """
    n = num_kept(keep, size)
    return np.sort((int(round_index) % size + np.arange(n)) % size).astype(np.int32)


def sample_from_singular_values(
    singular_values: Mapping[str, np.ndarray],
    keep_ratio: float,
    seed: SeedLike = 0,
    strategy: str = "prism",
    *,
    gamma: float | None = None,
    clients_per_round: int | None = None,
    plan: SubmodelPlan | None = None,
    output_keep: float | None = None,
    output_rule: str = "random",
    model_name: str = "model",
    kernels: Mapping[str, int] | None = None,
) -> Selection:
    """`sample` given the singular values per layer (what a server holds without a Keras model).

    The one code path of every spectral selection (`sample` and `prism_tf.federated.methods.Method.select` both call
    it): layer ``name`` draws its kernels from the stream ``(seed, "kernels", name)`` and, with ``output_keep``
    (which needs ``plan``), owned output group ``g`` its channels from ``(seed, "channels", g)``
    (`prism_tf.streams`), so adding or reordering layers changes no other layer's draw. ``kernels``: per layer, a
    count that replaces ``ceil(keep_ratio·r)`` (a rank allocation, `prism_tf.budget.flops_aware_kernels`).
    """
    check_keep_ratio(keep_ratio)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    gamma = gamma if gamma is not None else default_gamma(keep_ratio)
    chosen = {}
    for name, s in singular_values.items():
        s = np.asarray(s, dtype=np.float64)
        k = int(kernels[name]) if kernels and name in kernels else num_kept(keep_ratio, s.shape[0])
        indices, scale = draw(s, k, strategy, streams.rng(seed, streams.KERNELS, name),
                              gamma=gamma, clients_per_round=clients_per_round)
        chosen[name] = LayerSelection(indices, scale, s.shape[0])
    selection = Selection(chosen, float(keep_ratio), strategy)
    if output_keep is None:
        return selection
    if plan is None:
        raise ValueError("sample_from_singular_values: output_keep needs the model's plan (plan=SubmodelPlan.of(m))")
    return dataclasses.replace(selection, channels=output_channels(plan, output_keep, output_rule, seed, model_name))


def draw(
    singular_values: np.ndarray,
    k: int,
    strategy: str,
    rng: np.random.Generator,
    *,
    gamma: float = 4.0,
    clients_per_round: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` kernel indices (sorted) and their multipliers ω from one layer's singular values."""
    s = np.maximum(np.asarray(singular_values, dtype=np.float64), 0.0)
    r = s.shape[0]
    if not 1 <= k <= r:
        raise ValueError(f"cannot draw {k} of {r} kernels")
    if strategy == "prism":
        weights = s**gamma
        # A tiny floor keeps every kernel reachable (docs/algorithm.md §2: none is always kept) when some s_i = 0.
        weights = weights + 1e-12 * max(weights.max(), 1e-30)
        indices = rng.choice(r, size=k, replace=False, p=weights / weights.sum())
        scale = np.ones(k)
    elif strategy == "top":
        indices = np.argsort(-s, kind="stable")[:k]
        scale = np.ones(k)
    elif strategy == "uniform":
        indices = rng.choice(r, size=k, replace=False)
        scale = np.ones(k)
    elif strategy in ("unbiased", "collective"):
        if strategy == "collective" and (clients_per_round is None or clients_per_round < 1):
            raise ValueError("strategy 'collective' needs clients_per_round >= 1")
        pi = np.asarray(_inclusion(strategy, tuple(s), k, clients_per_round or 1))
        indices = conditional_poisson_sample(pi, rng)
        if strategy == "unbiased":
            scale = 1.0 / pi[indices]
        else:
            c = clients_per_round
            scale = c / (1.0 + (c - 1) * pi[indices])
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    order = np.argsort(indices)
    return np.asarray(indices)[order].astype(np.int32), np.asarray(scale)[order].astype(np.float32)


@functools.lru_cache(maxsize=1024)
def _inclusion(strategy: str, s: tuple[float, ...], k: int, clients_per_round: int) -> tuple[float, ...]:
    # Every client of a round draws from the same spectrum: compute its design once.
    s_arr = np.asarray(s)
    if strategy == "unbiased":
        return tuple(unbiased_inclusion(s_arr, k))
    return tuple(collective_inclusion(s_arr, k, clients_per_round))


def unbiased_inclusion(singular_values: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of the ``unbiased`` strategy (Korzhenkov & Louizos 2024, Eq. 5 / Algorithm 1).

    The top ``t`` terms get π = 1 and the rest ``(k − t)·λ_i / Σ_{j>t} λ_j``; among the feasible ``t`` (all π ≤ 1)
    the one with the least variance ``Σ λ_i² (1/π_i − 1)`` is taken.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    r = s.shape[0]
    order = np.argsort(-s, kind="stable")
    lam = np.maximum(s[order], 1e-30)
    best, best_var = None, np.inf
    for t in range(k + 1):
        rest = lam[t:].sum()
        if t == k:
            pi = np.concatenate([np.ones(t), np.zeros(r - t)])
            var = np.inf if r > k else 0.0
            if r > k and np.all(lam[t:] <= 1e-29):
                var = 0.0
        else:
            tail = (k - t) * lam[t:] / rest
            if tail.max() > 1.0 + 1e-12:
                continue
            pi = np.concatenate([np.ones(t), np.minimum(tail, 1.0)])
            var = float(np.sum(lam**2 * (1.0 / pi - 1.0)))
        if var < best_var:
            best, best_var = pi, var
    if best is None:  # only t = k remained (the rest is all zeros)
        best = np.concatenate([np.ones(k), np.zeros(r - k)])
    out = np.empty(r)
    out[order] = best
    return out


def collective_inclusion(singular_values: np.ndarray, k: int, clients_per_round: int) -> np.ndarray:
    """Inclusion probabilities of the ``collective`` strategy (Korzhenkov & Louizos 2024, Eq. 8 / Algorithm 2).

    ``π_i = clip((c·λ_i − 1)/(C − 1), 0, 1)`` with ``c`` such that ``Σ π_i = k``; ``C = 1`` is ``top``. ``c`` is
    found by bisection (``Σ π`` is continuous and non-decreasing in ``c``), which gives the same solution as the
    paper's search over ``(t, u)``.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    r = s.shape[0]
    if k >= r:
        return np.ones(r)
    if clients_per_round == 1:
        pi = np.zeros(r)
        pi[np.argsort(-s, kind="stable")[:k]] = 1.0
        return pi
    lam = np.maximum(s, 1e-30)
    total = lambda c: np.clip((c * lam - 1.0) / (clients_per_round - 1), 0.0, 1.0).sum()  # noqa: E731
    lo, hi = 0.0, 1.0 / lam.max()
    while total(hi) < k:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) < k else (lo, mid)
    pi = np.clip((hi * lam - 1.0) / (clients_per_round - 1), 0.0, 1.0)
    return _fix_total(pi, k)


def _fix_total(pi: np.ndarray, k: int) -> np.ndarray:
    """Remove the bisection's residual so that Σπ = k exactly, scaling only the fractional terms."""
    frac = (pi > 0) & (pi < 1)
    need = k - pi[~frac].sum()
    if frac.any() and pi[frac].sum() > 0:
        pi = pi.copy()
        pi[frac] *= need / pi[frac].sum()
    return np.clip(pi, 0.0, 1.0)


def conditional_poisson_sample(inclusion: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw exactly ``k = Σπ`` distinct indices whose marginal inclusion probabilities are ``π`` (Tillé 2006).

    Conditional Poisson (maximum-entropy, rejective) sampling: units with π = 1 are always taken, units with π = 0
    never; for the rest, working odds are fitted so that the conditional-Poisson design has exactly the target
    marginals (`conditional_poisson_odds`), and one sample is drawn sequentially from that design (no rejection).
    """
    pi = np.asarray(inclusion, dtype=np.float64)
    k = int(round(pi.sum()))
    certain = np.flatnonzero(pi >= 1.0 - 1e-12)
    free = np.flatnonzero((pi > 1e-12) & (pi < 1.0 - 1e-12))
    m = k - certain.shape[0]
    if m <= 0 or free.shape[0] == 0:
        return np.sort(certain[:k])
    if m >= free.shape[0]:
        return np.sort(np.concatenate([certain, free]))
    log_odds = conditional_poisson_odds(tuple(pi[free].round(12)), m)
    taken = _draw_conditional_poisson(np.asarray(log_odds), m, rng)
    return np.sort(np.concatenate([certain, free[taken]]))


@functools.lru_cache(maxsize=256)
def conditional_poisson_odds(target: tuple[float, ...], m: int, iterations: int = 500) -> tuple[float, ...]:
    """Log working odds ``θ`` whose conditional-Poisson design of size ``m`` has marginals ``target``.

    Fixed point ``θ ← θ + log π_target − log π(θ)`` (Tillé 2006, §5.6), with the exact marginals of the design
    computed by `conditional_poisson_inclusion`. Cached: the server reuses it for every client of a round.
    """
    target_arr = np.asarray(target)
    theta = np.log(target_arr / (1.0 - target_arr))
    for _ in range(iterations):
        current = conditional_poisson_inclusion(theta, m)
        theta = theta + np.log(target_arr) - np.log(np.maximum(current, 1e-300))
        if np.max(np.abs(current - target_arr)) < 1e-10:
            break
    return tuple(theta)


def conditional_poisson_inclusion(log_odds: np.ndarray, m: int) -> np.ndarray:
    """Exact inclusion probabilities of conditional Poisson sampling of size ``m`` with working odds ``e^θ``.

    ``π_i = w_i · e_{m−1}(w without i) / e_m(w)`` with elementary symmetric polynomials computed in log space
    by forward and backward recursions (stable for hundreds of units).
    """
    theta = np.asarray(log_odds, dtype=np.float64)
    n = theta.shape[0]
    forward = _log_esp_table(theta, m)  # forward[i, j] = log e_j(w_0..w_{i-1})
    backward = _log_esp_table(theta[::-1], m)[::-1]  # backward[i, j] = log e_j(w_i..w_{n-1})
    # e_{m-1}(w_{-i}) = Σ_a e_a(w_<i) · e_{m-1-a}(w_>i)
    left = forward[:n, :m]  # [n, m] for a = 0..m-1
    right = backward[1 : n + 1, :m][:, ::-1]  # [n, m], column a holds e_{m-1-a}(w_>i)
    log_rest = np.logaddexp.reduce(left + right, axis=1)
    return np.exp(theta + log_rest - forward[n, m])


def _log_esp_table(theta: np.ndarray, m: int) -> np.ndarray:
    n = theta.shape[0]
    table = np.full((n + 1, m + 1), -np.inf)
    table[0, 0] = 0.0
    for i in range(n):
        table[i + 1, 0] = 0.0
        table[i + 1, 1:] = np.logaddexp(table[i, 1:], table[i, :-1] + theta[i])
    return table


def _draw_conditional_poisson(theta: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    # Sequential draw: unit i is taken with probability w_i e_{need-1}(w_>i) / e_need(w_≥i).
    backward = _log_esp_table(theta[::-1], m)[::-1]
    taken, need = [], m
    for i in range(theta.shape[0]):
        if need == 0:
            break
        p = np.exp(theta[i] + backward[i + 1, need - 1] - backward[i, need])
        if rng.random() < p:
            taken.append(i)
            need -= 1
    return np.asarray(taken, dtype=np.int64)
