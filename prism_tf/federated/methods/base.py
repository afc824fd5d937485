"""The interface of a federated method, the registry of methods, and what every method shares.

docs/algorithm.md §4 (the methods), §5 (equal client cost). A method is a subclass of `Method` registered under
its name (`register`); the federated process, round replay, the exporter and the driver ask it, never its name:

- `Method.spectral`: whether the server model is factorized into principal kernels;
- `Method.sizes`: its sub-model's size per sliced group at a keep ratio;
- `Method.select`: one client's `prism_tf.Selection` for one round;
- `Method.client_keep_ratio`: the keep ratio a client trains at in a round (its fixed `Method.capacity`);
- `Method.deployed_models`: the model(s) a user of the method deploys;
- `Method.match_cost` / `Method.with_budget` / `Method.model_width`: how it is sized to PriSM's client cost, and
  restored from a run's stored budget;
- `Method.trained_method`: the method the server runs for it (``small`` trains its narrower model whole).

Randomness (`prism_tf.streams`): client ``c``'s kernels and channels in the round of index ``t`` (0-based) come
from the named streams of ``(seed, t, c)``; a device's capacity (``keep_mix``) from ``((seed, c), "capacity")``,
fixed for the run.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

import prism_tf
from prism_tf import budget, streams
from prism_tf.plan import SubmodelPlan
from prism_tf.sampling import Selection

if TYPE_CHECKING:
    import tensorflow as tf

REGISTRY: dict[str, type[Method]] = {}
"""Every registered method class by name, in registration order (`register`)."""

_M = TypeVar("_M", bound="type[Method]")


def register(cls: _M) -> _M:
    """Class decorator: make ``cls`` (a concrete `Method` with a class attribute ``name``) known by its name.

    Raises:
      TypeError: ``cls`` is no `Method`, is abstract or has no ``name`` of its own.
      ValueError: another class is registered under that name.
    """
    name = cls.__dict__.get("name")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register: {cls!r} is not a Method subclass")
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: {cls.__qualname__} needs a class attribute `name` (the --method value)")
    if inspect.isabstract(cls):
        raise TypeError(f"register: {cls.__qualname__} leaves {', '.join(sorted(cls.__abstractmethods__))} abstract")
    if REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"register: method {name!r} is {REGISTRY[name].__qualname__} already, not "
                         f"{cls.__qualname__}")
    REGISTRY[name] = cls
    return cls


class _MethodType(abc.ABCMeta):
    """Calling the base class with a name builds that method: ``Method("fjord", keep_ratio=0.5)`` is
    ``Method.create("fjord", keep_ratio=0.5)`` (how methods were built when they were one class)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Method:
            return Method.create(*args, **kwargs)
        return super().__call__(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class CostBudget:
    """What a method is sized to (docs/algorithm.md §5): PriSM's sub-model cost at the run's keep ratio.

    Attributes:
      metric: the cost compared (`prism_tf.budget.METRICS`).
      target: `prism_tf.cost` of PriSM's sub-model of the full model.
      full: `prism_tf.cost` of the full (unfactorized) server model.
      server_model: the full server model.
      build_model: ``width -> model``, for methods that change the model's width (``small``).
      max_width: the widest such model (the run's ``--width``).
      factorized: the factorized server model PriSM's target was measured on (a rank allocation sizes itself
        on it).
    """

    metric: str
    target: Mapping[str, float]
    full: Mapping[str, float]
    server_model: tf.keras.Model
    build_model: Callable[[int], tf.keras.Model] | None = None
    max_width: int | None = None
    factorized: tf.keras.Model | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method(metaclass=_MethodType):
    """A federated method: its server model and each client's selection (docs/algorithm.md §4).

    Build one by name with `Method.create` (or by its class). Subclasses set the class attribute ``name``, add
    their own options as dataclass fields and are made known with `register`.

    Attributes:
      keep_ratio: a client's budget: the sub-model's share of principal kernels (spectral methods); for width
        methods their nominal channel fraction (docs/algorithm.md §2, §5).
      output_keep: PriSM's memory-efficient variant: share of owned output channels kept (``None``: all). It also
        sets the PriSM sub-model every method's budget is matched to (`equal_cost_method`).
      keep_mix: heterogeneous devices: ``((ratio, share), ...)``, e.g. ``((0.2, 0.6), (0.4, 0.4))`` (the NeurIPS'24
        mix). A device's ratio is fixed for the run (`capacity`). ``None``: every client uses ``keep_ratio``.
    """

    name: ClassVar[str] = ""
    spectral: ClassVar[bool] = False
    """Whether the server model is factorized into principal kernels."""
    width: ClassVar[bool] = False
    """Whether clients train width slices (channel subsets) of the unfactorized server model."""
    always_matched: ClassVar[bool] = False
    """Whether the method is sized by the budget even under ``--match nominal`` (a narrower model has no nominal
    size)."""

    keep_ratio: float = 0.2
    output_keep: float | None = None
    keep_mix: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.keep_mix is not None:
            for ratio, share in self.keep_mix:
                prism_tf.sampling.check_keep_ratio(ratio, "keep_mix ratio")
                if not share > 0:
                    raise ValueError(f"keep_mix shares must be positive, got {share}")
        prism_tf.sampling.check_keep_ratio(self.keep_ratio)

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, **options: Any) -> Method:
        """The method registered as ``name`` with ``options``.

        An option of another method (``strategy`` for ``fedavg``, ``fjord_widths`` for ``prism``) is ignored, so a
        run's options build any method; an option no method has is an error.

        Raises:
          ValueError: an unknown method name, or a bad option value.
          TypeError: an option no method has.
        """
        from prism_tf.federated.methods import METHODS  # the package registers every method on import

        if name not in REGISTRY:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
        known = {option for method in REGISTRY.values() for option in method.options()}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"Method.create: unknown option(s) {', '.join(unknown)}; methods take "
                            f"{', '.join(sorted(known))}")
        method = REGISTRY[name]
        accepted = method.options()
        return method(**{k: v for k, v in options.items() if k in accepted})

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The options this method takes (its dataclass fields that ``__init__`` accepts)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    # --- a client's sub-model ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def sizes(self, plan: SubmodelPlan, keep_ratio: float | None = None) -> dict[str, int]:
        """Sub-model size of every sliced group at ``keep_ratio`` (default the method's); ``{}``: all of it."""

    @abc.abstractmethod
    def select(
        self,
        plan: SubmodelPlan,
        singular_values: Mapping[str, np.ndarray],
        seed: tuple[int, ...],
        *,
        keep_ratio: float | None = None,
        clients_per_round: int | None = None,
        round_index: int | None = None,
    ) -> Selection:
        """One client's selection for one round, reproducible from ``seed`` (``(run_seed, round_index, client)``).

        Args:
          plan: the server model's `SubmodelPlan`.
          singular_values: per principal layer, its singular values (spectral methods).
          seed: the client's seed for this round.
          keep_ratio: the client's keep ratio (default the method's; `client_keep_ratio`).
          clients_per_round: the ``collective`` strategy's ``C``.
          round_index: the round's 0-based index (methods whose selection moves with the round).
        """

    def capacity(self, seed: int, client_id: int) -> float:
        """Client ``client_id``'s keep ratio for the whole run: a function of ``(seed, client_id)`` only.

        With ``keep_mix``, each device draws its ratio once, independently, with probabilities ∝ the shares, from
        the stream ``((seed, client_id), "capacity")``: over ``N`` devices the count of a share ``q`` is
        Binomial(N, q) (shares honored in expectation, not exactly). Without: ``keep_ratio``.
        """
        if not self.keep_mix:
            return self.keep_ratio
        ratios, shares = zip(*self.keep_mix, strict=True)
        cumulative = np.cumsum(shares) / float(sum(shares))
        u = streams.rng((int(seed), int(client_id)), streams.CAPACITY).random()
        return float(ratios[min(int(np.searchsorted(cumulative, u, side="right")), len(ratios) - 1)])

    def client_keep_ratio(self, seed: int, client_id: int, round_index: int = 0) -> float:
        """The keep ratio client ``client_id`` trains at in the round of index ``round_index`` (0-based): its
        `capacity` (methods whose clients change width every round override this)."""
        return float(self.capacity(seed, client_id))

    # --- what is deployed and trained -------------------------------------------------------------------------
    def deployed_models(self, server_model: tf.keras.Model) -> dict[str, tf.keras.Model]:
        """The models a user of this method deploys (docs/algorithm.md §4, §6), from the trained ``server_model``:
        ``{"deployed": model}``, plus ``"server"`` where the deployed model is not the server model."""
        return {"deployed": server_model}

    def trained_method(self) -> Method:
        """The method the federated process runs for this one (itself, unless it trains another way)."""
        return self

    # --- the client budget (docs/algorithm.md §5) -------------------------------------------------------------
    def match_cost(self, target: CostBudget) -> tuple[Method, Mapping[str, float], dict[str, Any]]:
        """This method sized to ``target``: ``(method, the cost of its (widest) client model, budget fields)``.

        The budget fields join the run's budget record (``budget.json``): ``width_fraction`` of width methods,
        ``small_width`` of ``small``. Default: the method as it is, at PriSM's cost.
        """
        return self, target.target, {}

    def with_budget(self, info: Mapping[str, Any]) -> Method:
        """This method at a run's stored budget record (``budget.json``, what `match_cost` returned)."""
        return self

    def model_width(self, info: Mapping[str, Any], width: int) -> int:
        """The server model's width at budget record ``info`` for a run of model width ``width``."""
        return int(width)


def equal_cost_method(
    method: Method,
    server_model: tf.keras.Model,
    metric: str = "flops",
    *,
    factorize_options: dict | None = None,
    build_model: Callable[[int], tf.keras.Model] | None = None,
    max_width: int | None = None,
) -> tuple[Method, dict]:
    """``method`` at PriSM's client cost, and a description of that budget (docs/algorithm.md §5).

    The target is the PriSM sub-model of ``server_model`` (the full, unfactorized model) at ``method.keep_ratio``
    and ``method.output_keep``; the method sizes itself to it (`Method.match_cost`): a width method gets the
    ``width_fraction`` whose sub-model's ``metric`` is closest to the target (for FjORD, its widest grid width);
    ``small`` needs ``build_model(width)`` and ``max_width``, and names the width whose model is closest
    (``small_width``); other methods are returned unchanged.

    The budget (JSON-ready): ``metric``, ``keep_ratio``, ``output_keep``, ``target`` (PriSM's ``metric``),
    ``width_fraction`` (``None`` unless matched), ``{flops,params,activation_bytes}_ratio`` of the method's
    (widest) client model and ``prism_{flops,params,activation_bytes}_ratio`` of PriSM's, relative to the full
    model.
    """
    if metric not in budget.METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(budget.METRICS)}")
    full = prism_tf.cost(server_model)
    fm = prism_tf.factorize(server_model, **(factorize_options or {}))
    fm_plan = SubmodelPlan.of(fm)
    target = budget.submodel_cost(fm, fm_plan, budget.spectral_sizes(fm_plan, method.keep_ratio, method.output_keep))
    method, matched, fields = method.match_cost(
        CostBudget(metric, target, full, server_model, build_model, max_width, fm))
    info = {"metric": metric, "keep_ratio": method.keep_ratio, "output_keep": method.output_keep,
            "target": float(target[metric]), "width_fraction": None, **fields}
    info.update({f"{m}_ratio": r for m, r in budget.cost_ratios(matched, full).items()})
    info.update({f"prism_{m}_ratio": r for m, r in budget.cost_ratios(target, full).items()})
    return method, info


def round_selections(
    method: Method,
    plan: SubmodelPlan,
    singular_values: Mapping[str, np.ndarray],
    seed: int,
    round_index: int,
    client_ids: Sequence[int],
    collective_clients: int | None = None,
) -> list[Selection]:
    """Every client's selection in the round of index ``round_index`` (0-based), one per id of ``client_ids``.

    Client ``c`` selects with seed ``(seed, round_index, c)`` at its keep ratio `Method.client_keep_ratio` (its
    fixed capacity; FjORD's width of the round). The ``collective`` strategy's ``C`` is the number of this round's
    clients at that client's keep ratio (Korzhenkov & Louizos 2024, Eq. 8: the clients that share a keep ratio),
    unless ``collective_clients`` is set. The process (`tff_pipelines.round.process.PrismProcess.selections`) and
    round replay (`prism_tf.federated.replay`) both call this (docs/design.md, "One round").
    """
    ids = [int(c) for c in client_ids]
    if any(c < 0 for c in ids):
        raise ValueError(f"selections: client ids must be non-negative integers, got {ids}")
    keeps = [method.client_keep_ratio(seed, c, round_index) for c in ids]
    sharing = collections.Counter(keeps)
    return [method.select(plan, singular_values, (seed, round_index, c), keep_ratio=keep, round_index=round_index,
                          clients_per_round=collective_clients or sharing[keep])
            for c, keep in zip(ids, keeps, strict=True)]


def deployed_models(method: Method, server_model: tf.keras.Model) -> dict[str, tf.keras.Model]:
    """The models a user of ``method`` deploys from the trained ``server_model`` (`Method.deployed_models`;
    docs/algorithm.md §4, §6)."""
    return method.deployed_models(server_model)


__all__ = ["REGISTRY", "CostBudget", "Method", "deployed_models", "equal_cost_method", "register",
           "round_selections"]
