"""Rank-truncated deployment: the spectrum as a compression knob (docs/export.md, "Picking a rank").

Every principal layer of a trained PriSM server model holds its kernel as ``A·diag(ω)·B`` with singular values
``s`` (the server re-factorizes after each round, docs/algorithm.md §3), so the deployed model can be cut to any
rank after training. Per kernel group (a layer's name, or ``layer/pair``), `truncation_ranks` picks the rank to
keep by one of two rules:

- ``rank_keep = F``: ``ceil(F·r)`` kernels (at least 1), the share PriSM's clients use (`prism_tf.sampling.num_kept`);
- ``energy = E``: the smallest ``k`` whose ``k`` largest singular values keep a share ``E`` of the squared ones,
  ``Σ_{i<k} s_i² ≥ E·Σ_i s_i²`` (``s`` sorted descending; the kernel's squared singular values are ``s²``, since
  ``A = U·diag(√s)``, ``B = diag(√s)·Vᵀ``).

The kept kernels are the ``k`` with the largest ``s`` (taken from ``s`` itself, not from their order), which for a
re-factorized layer is ``A[..., :k]``, ``B[:k]``: by Eckart-Young the best rank-``k`` approximation of the kernel.
`truncate` then writes each layer in the smaller of its two forms: factorized (a principal layer of rank ``k``) or
plain (the Keras layer with ``W = A_k·diag(ω_k)·B_k``), measured in parameters (default) or multiply-adds, and
reports both numbers for both forms. Pure Keras and numpy; no TFF.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from prism_tf import costs, kinds
from prism_tf.factorization import clone_with_ranks, unfactorize
from prism_tf.kinds import is_principal, walk_layers

CRITERIA = ("params", "flops")
FORMS = ("smaller", "factorized", "plain")
_TOLERANCE = 1e-12  # relative slack of the energy rule: E·Σs² computed in float64 may land one ulp above a partial sum


@dataclasses.dataclass(frozen=True)
class GroupRank:
    """The rank kept of one kernel group and the share of its squared singular values that rank keeps."""

    group: str
    rank: int
    full_rank: int
    energy: float


@dataclasses.dataclass(frozen=True)
class TruncatedLayer:
    """One principal layer of the truncated model: its kernel groups' ranks, the form written and what each form
    costs (``params``: every weight the layer holds, as `prism_tf.cost` counts them; ``flops``: multiply-adds per
    example)."""

    name: str
    kind: str
    groups: tuple[GroupRank, ...]
    form: str  # "factorized" or "plain"
    factorized_params: int
    factorized_flops: int
    plain_params: int
    plain_flops: int

    @property
    def params(self) -> int:
        """Parameters of the form written."""
        return self.factorized_params if self.form == "factorized" else self.plain_params

    @property
    def flops(self) -> int:
        """Multiply-adds per example of the form written."""
        return self.factorized_flops if self.form == "factorized" else self.plain_flops


@dataclasses.dataclass(frozen=True)
class TruncationReport:
    """What `truncate` kept and wrote, per layer, and the whole model's cost before and after."""

    layers: tuple[TruncatedLayer, ...]
    rank_keep: float | None
    energy: float | None
    criterion: str
    form: str
    params: int  # the truncated model's `prism_tf.cost` params
    flops: int  # and multiply-adds per example
    source_params: int  # the model `truncate` was given (factorized, full rank)
    source_flops: int

    def __str__(self) -> str:
        rule = f"rank share {self.rank_keep}" if self.rank_keep is not None else f"energy {self.energy}"
        lines = [f"truncated by {rule}; form: {self.form} (by {self.criterion}); params {self.source_params:,} -> "
                 f"{self.params:,}, multiply-adds {self.source_flops:,} -> {self.flops:,}",
                 f"  {'layer':<28} {'rank kept/full':>16} {'energy':>8} {'form':<10} {'params':>10} {'flops':>12}"
                 f"  (factorized params/flops | plain params/flops)"]
        for layer in self.layers:
            for i, g in enumerate(layer.groups):
                head = f"  {g.group:<28} {f'{g.rank}/{g.full_rank}':>16} {g.energy:>8.4f}"
                if i == 0:
                    lines.append(f"{head} {layer.form:<10} {layer.params:>10,} {layer.flops:>12,}  "
                                 f"({layer.factorized_params:,}/{layer.factorized_flops:,} | "
                                 f"{layer.plain_params:,}/{layer.plain_flops:,})")
                else:
                    lines.append(head)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form (each layer with its chosen ``params`` and ``flops``)."""
        out = dataclasses.asdict(self)
        for entry, layer in zip(out["layers"], self.layers, strict=True):
            entry.update(params=layer.params, flops=layer.flops)
        return out


def share_rank(full_rank: int, rank_keep: float) -> int:
    """``ceil(rank_keep·r)`` kernels, at least 1 (the rule of PriSM's clients, `prism_tf.sampling.num_kept`)."""
    _check_share(rank_keep, "rank_keep")
    return max(1, min(int(full_rank), math.ceil(float(rank_keep) * int(full_rank) - 1e-9)))


def energy_rank(singular_values: Sequence[float] | np.ndarray, energy: float) -> int:
    """The smallest ``k`` whose ``k`` largest singular values keep a share ``energy`` of ``Σ s²`` (at least 1).

    ``singular_values`` may be in any order: they are sorted here.
    """
    _check_share(energy, "energy")
    s = np.sort(np.abs(np.asarray(singular_values, np.float64)))[::-1]
    if s.size == 0:
        raise ValueError("energy_rank: no singular values")
    cumulative = np.cumsum(s * s)
    total = cumulative[-1]
    if total <= 0:
        return 1
    return int(min(s.size, 1 + np.argmax(cumulative >= float(energy) * total * (1 - _TOLERANCE))))


def kept_indices(singular_values: Sequence[float] | np.ndarray, rank: int) -> np.ndarray:
    """The indices of the ``rank`` largest singular values, in ascending index order (``0..rank−1`` for a sorted
    spectrum; ties keep the earlier index)."""
    s = np.asarray(singular_values, np.float64)
    return np.sort(np.argsort(-s, kind="stable")[: int(rank)])


def truncation_ranks(model: tf.keras.Model, *, rank_keep: float | None = None,
                     energy: float | None = None) -> dict[str, GroupRank]:
    """The rank to keep of every kernel group of ``model``'s principal layers, by ``rank_keep`` or ``energy``
    (exactly one; see the module docstring).

    Raises:
      ValueError: both or neither rule, a share outside (0, 1], or a model without principal layers.
    """
    _check_rule(rank_keep, energy)
    groups = kinds.kernel_groups(model)
    if not groups:
        raise ValueError(f"truncate: model '{model.name}' has no principal-kernel layer (factorize it first)")
    out = {}
    for group, (layer, pair) in groups.items():
        s = np.asarray(layer.factors(pair).singular_values.numpy(), np.float64)
        rank = share_rank(s.size, rank_keep) if rank_keep is not None else energy_rank(s, energy)
        squared = s * s
        kept = float(squared[kept_indices(s, rank)].sum() / squared.sum()) if squared.sum() > 0 else 1.0
        out[group] = GroupRank(group, rank, int(s.size), kept)
    return out


def truncate(
    model: tf.keras.Model,
    *,
    rank_keep: float | None = None,
    energy: float | None = None,
    criterion: str = "params",
    form: str = "smaller",
    input_shape: Sequence[int] | None = None,
) -> tuple[tf.keras.Model, TruncationReport]:
    """``model`` with every principal layer cut to the rank `truncation_ranks` picks, each layer in the smaller form.

    Args:
      model: a built functional or Sequential model with principal layers (a trained server model; a plain model
        is `prism_tf.factorize`\\ d first by the caller).
      rank_keep: keep ``ceil(rank_keep·r)`` kernels of every kernel group; or
      energy: keep the fewest kernels holding this share of each group's squared singular values.
      criterion: ``"params"`` (default) or ``"flops"`` (multiply-adds per example): what "smaller" compares. The
        two agree for convolutions and Dense layers up to the bias and the ``2k`` frozen ``s``, ``ω`` of a
        principal layer; they disagree for embeddings (a plain lookup costs no multiply-adds).
      form: ``"smaller"`` (per layer, by ``criterion``; a tie goes to the plain layer), or every truncated layer
        ``"factorized"`` or ``"plain"``.
      input_shape: per-example input shape if the model's is not fully known (for the multiply-adds).

    Returns:
      ``(truncated, report)``: a new model (``model`` is not changed) whose factorized layers have rank ``k`` and
      ``ω`` folded into ``B`` (``ω = 1``; the function is the same), its plain layers ``W = A_k·diag(ω_k)·B_k``, every
      other weight copied; and a `TruncationReport` whose ``params``/``flops`` are ``prism_tf.cost`` of the result.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"truncate: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if form not in FORMS:
        raise ValueError(f"truncate: form must be one of {', '.join(FORMS)}, got {form!r}")
    ranks = truncation_ranks(model, rank_keep=rank_keep, energy=energy)
    factored = _truncated_factorized(model, {g: r.rank for g, r in ranks.items()})
    names = [layer.name for layer in kinds.principal_layers(factored)]
    plain = unfactorize(factored)
    factored_cost = costs.cost(factored, input_shape)
    plain_cost = costs.cost(plain, input_shape)
    factored_layers = {layer.name: layer for layer in walk_layers(factored)}
    plain_layers = {layer.name: layer for layer in walk_layers(plain)}
    report_layers, unfactor = [], []
    for name in names:
        layer = factored_layers[name]
        fp, ff = _params(layer), factored_cost["layers"].get(name, 0)
        pp, pf = _params(plain_layers[name]), plain_cost["layers"].get(name, 0)
        if form == "smaller":  # by the criterion, then the other measure; a tie goes to the plain layer
            smaller = (fp, ff) < (pp, pf) if criterion == "params" else (ff, fp) < (pf, pp)
            chosen = "factorized" if smaller else "plain"
        else:
            chosen = form
        if chosen == "plain":
            unfactor.append(name)
        groups = tuple(ranks[kinds.group_name(name, pair)] for pair in layer.pairs)
        report_layers.append(TruncatedLayer(name, kinds.kind_of(layer).name, groups, chosen, fp, ff, pp, pf))
    result = unfactorize(factored, only=unfactor) if unfactor else factored
    total = costs.cost(result, input_shape)
    source = costs.cost(model, input_shape)
    report = TruncationReport(tuple(report_layers), rank_keep, energy, criterion, form, total["params"],
                              total["flops"], source["params"], source["flops"])
    return result, report


def _truncated_factorized(model: tf.keras.Model, ranks: dict[str, int]) -> tf.keras.Model:
    """A copy of ``model`` with each kernel group at ``ranks[group]``: the kernels of largest ``s``, ω folded in."""
    clone = clone_with_ranks(model, ranks)
    sources = {layer.name: layer for layer in walk_layers(model)}
    for layer in walk_layers(clone):
        source = sources[layer.name]
        if not is_principal(source):
            if source.weights:
                layer.set_weights(source.get_weights())
            continue
        factor_ids = {id(v) for pair in source.pairs for v in source.factors(pair)}
        for target, weight in zip(layer.weights, source.weights, strict=True):
            if id(weight) not in factor_ids:
                target.assign(weight)
        for pair in source.pairs:
            f = source.factors(pair)
            s = f.singular_values.numpy()
            index = kept_indices(s, layer.pair_rank(pair))
            scale = f.scale.numpy()[index]
            combination = scale[:, np.newaxis] * np.take(f.combination.numpy(), index, axis=0)
            layer.set_pair_factors(pair, np.take(f.principal.numpy(), index, axis=-1), combination, s[index])
    return clone


def _params(layer: tf.keras.layers.Layer) -> int:
    return int(sum(np.prod(w.shape) for w in layer.weights))


def _check_share(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")


def _check_rule(rank_keep: float | None, energy: float | None) -> None:
    if (rank_keep is None) == (energy is None):
        raise ValueError("truncate: give exactly one of rank_keep and energy")
    if rank_keep is not None:
        _check_share(rank_keep, "rank_keep")
    else:
        _check_share(energy, "energy")


__all__ = ["CRITERIA", "FORMS", "GroupRank", "TruncatedLayer", "TruncationReport", "energy_rank", "kept_indices",
           "share_rank", "truncate", "truncation_ranks"]
