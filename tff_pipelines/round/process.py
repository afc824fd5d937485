"""The PriSM federated process: TFF computations composed into a `tff.learning.templates.LearningProcess`.

One round (docs/algorithm.md §1-§3), all placements explicit:

1. the server's driver samples each client's `Selection` (`Method.select`, numpy) from the singular values in
   the server state and places the index vectors at the clients with their data;
2. `distributor`: ``federated_select`` (or broadcast) sends each client only its sub-model;
3. `client_work`: the client rebuilds its sub-model, trains it locally and returns its sub-tensors;
4. `aggregator`: ``federated_aggregate`` averages every entry over the clients that trained it;
5. `finalizer`: the server finishes the averages, applies the server optimizer and re-factorizes.

Why the server samples (and not each client from a broadcast seed): the sampling laws, including the conditional
Poisson designs of ``unbiased``/``collective``, live once in numpy (`prism_tf.sampling`), the server needs each
client's indices anyway to route `federated_select`, and ``collective`` couples the clients of a round. The indices
travel inside each client's input struct (``<data, indices, scale>``), which keeps ``next(state, client_data)`` the
`LearningProcess` signature (docs/pitfalls.md, processes and client inputs).

Heterogeneous sub-model sizes (per-client keep ratios, FjORD's widths) change TFF types: `PrismProcess.next`
groups clients by size, runs one client phase per group and a single server update over the summed accumulators.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence

import grpc
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf.federated.config import check_batch_size, onednn_enabled  # noqa: F401 (re-exported)
from prism_tf.federated.methods import Method, round_selections
from prism_tf.plan import SERVER_ONLY
from tff_pipelines.round import aggregator, client_work, distributor, finalizer
from tff_pipelines.round.layout import RoundLayout

# The per-round sums of a client phase besides the updates (`aggregator.METRICS` + good/dropped client counts).
PHASE_METRICS = (*aggregator.METRICS, "clients_trained", "clients_dropped")


@dataclasses.dataclass
class RoundReport:
    """Per-round numbers the driver adds to the TFF metrics (traffic and cost are deployment truths)."""

    bytes_down_per_client: float
    bytes_up_per_client: float
    client_flops_per_example: float
    client_activation_bytes_per_example: float
    clients: int


class PrismProcess:
    """PriSM (or a peer method) as a TFF learning process with ``initialize``/``next``/weights accessors.

    ``learning_process`` is the underlying `tff.learning.templates.LearningProcess` for clients whose inputs are
    ``<data, indices, scale>`` structs; `next` takes plain client datasets, samples each client's sub-model and
    calls it. ``min_clients``: the fewest good clients a round of `next` needs (fewer: the round is skipped).
    """

    def __init__(
        self,
        server_model: tf.keras.Model,
        method: Method,
        element_type: tff.Type,
        training: client_work.ClientTraining,
        *,
        distribution: str = "select",
        refactorize_every: int = 1,
        weighting: str = "examples",
        seed: int = 0,
        collective_clients: int | None = None,
        server_optimizer: tff.learning.optimizers.Optimizer | None = None,
        lr_schedule: Callable[[int], float] | None = None,
        min_clients: int = 1,
    ) -> None:
        self.server_model = server_model
        self.method = method
        self.element_type = element_type
        # With a schedule, clients read the round's learning rate from their input struct (`client_inputs`).
        self.lr_schedule = lr_schedule
        if not (isinstance(min_clients, int | np.integer) and min_clients >= 1):
            raise ValueError(f"min_clients must be an integer >= 1, got {min_clients!r}")
        self.min_clients = int(min_clients)  # fewer good clients in a round: the round is skipped
        self.training = dataclasses.replace(training, round_lr=lr_schedule is not None)
        self.distribution = distribution
        self.refactorize_every = refactorize_every if method.spectral else 0
        self.weighting = weighting
        self.seed = int(seed)
        self.collective_clients = collective_clients
        self.server_optimizer = server_optimizer
        if distribution not in distributor.DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {distributor.DISTRIBUTIONS}, got {distribution!r}")
        self.plan = prism_tf.SubmodelPlan.of(server_model)
        self.layout = self._layout(_key(self._default_sizes()))
        self.server_model_bytes = self._layout(()).full_bytes()  # the (factorized) server model's
        self.full_cost = prism_tf.cost(server_model)
        self._server_update = finalizer.build_server_update(
            self.layout, self._phase(self.layout.sizes_key).type_signature.result[0].member,
            self.refactorize_every, server_optimizer)
        self.learning_process = self._build_learning_process()

    # --- the TFF computations -------------------------------------------------------------------------------
    def _default_sizes(self) -> dict[str, int]:
        return self.method.sizes(self.plan)

    @functools.lru_cache(maxsize=16)  # noqa: B019 - one layout per sub-model size, for the process's lifetime
    def _layout(self, sizes_key: tuple) -> RoundLayout:
        return RoundLayout.build(self.server_model, dict(sizes_key))

    @functools.lru_cache(maxsize=16)  # noqa: B019
    def _submodel_cost(self, sizes_key: tuple) -> dict:
        layout = self._layout(sizes_key)
        return prism_tf.cost(prism_tf.submodel.submodel_architecture(self.server_model, self.plan, layout.sizes))

    @functools.lru_cache(maxsize=16)  # noqa: B019
    def _phase(self, sizes_key: tuple) -> tff.Computation:
        """``(weights@SERVER, clients@CLIENTS) -> <accumulator, metrics>@SERVER`` for one sub-model size."""
        layout = self._layout(sizes_key)
        work = client_work.build_client_work(layout, self.element_type, self.training, self.distribution)
        distribute = distributor.build_distributor(layout, self.distribution)
        aggregate = aggregator.build_aggregator(layout, work.type_signature.result, self.weighting)
        client_type = tff.FederatedType(  # self.training: with a lr schedule, clients' inputs carry `lr`
            client_work.client_input_type(layout, self.element_type, self.training), tff.CLIENTS)

        @tff.tensorflow.computation(aggregate.accumulator_type)
        def sums_of(total):
            return collections.OrderedDict(sums=total["sums"], counts=total["counts"])

        @tff.tensorflow.computation(aggregate.accumulator_type)
        def metrics_of(total):
            return total["metrics"]

        @tff.federated_computation(tff.FederatedType(layout.weights_type(), tff.SERVER), client_type)
        def phase(weights, clients):
            received = distribute(weights, clients)
            outputs = tff.federated_map(
                work, tff.federated_zip(collections.OrderedDict(received=received, client=clients)))
            total = aggregate(outputs)  # updates and metrics in one aggregation: one rule drops a faulty client
            return tff.federated_map(sums_of, total), tff.federated_map(metrics_of, total)

        return phase

    def _build_learning_process(self) -> tff.learning.templates.LearningProcess:
        layout = self.layout
        initial = [w.numpy() for w in prism_tf.submodel.flat_weights(self.server_model)]
        trainable = [i for i, t in enumerate(layout.trainable) if t]
        frozen = [i for i, t in enumerate(layout.trainable) if not t]

        @tff.tensorflow.computation
        def initial_state():
            weights = [tf.constant(w) for w in initial]
            return collections.OrderedDict(
                weights=weights, round_num=tf.constant(0, tf.int64),
                optimizer_state=finalizer.initial_optimizer_state(layout, self.server_optimizer))

        state_type = initial_state.type_signature.result

        @tff.federated_computation
        def initialize():
            return tff.federated_eval(initial_state, tff.SERVER)

        phase = self._phase(layout.sizes_key)
        accumulator_type = phase.type_signature.result[0].member
        metrics_type = phase.type_signature.result[1].member
        finish = self._finish = self._finish_computation(state_type, accumulator_type, metrics_type)

        @tff.tensorflow.computation(state_type)
        def weights_of(state):
            return state["weights"]

        @tff.federated_computation(tff.FederatedType(state_type, tff.SERVER), phase.type_signature.parameter[1])
        def next_fn(state, clients):
            acc, metrics = phase(tff.federated_map(weights_of, state), clients)
            new_state, round_metrics = tff.federated_map(finish, tff.federated_zip((state, acc, metrics)))
            return tff.learning.templates.LearningProcessOutput(new_state, round_metrics)

        @tff.tensorflow.computation(state_type)
        def get_model_weights(state):
            w = state["weights"]
            return tff.learning.models.ModelWeights(trainable=[w[i] for i in trainable],
                                                    non_trainable=[w[i] for i in frozen])

        weights_type = get_model_weights.type_signature.result

        @tff.tensorflow.computation(state_type, weights_type)
        def set_model_weights(state, model_weights):
            w = [None] * len(layout.tensors)
            for i, value in zip(trainable, model_weights.trainable, strict=True):
                w[i] = value
            for i, value in zip(frozen, model_weights.non_trainable, strict=True):
                w[i] = value
            return collections.OrderedDict(weights=w, round_num=state["round_num"],
                                           optimizer_state=state["optimizer_state"])

        return tff.learning.templates.LearningProcess(initialize, next_fn, get_model_weights, set_model_weights)

    def _finish_computation(self, state_type, accumulator_type, metrics_type) -> tff.Computation:
        update = self._server_update

        @tff.tensorflow.computation(state_type, accumulator_type, metrics_type)
        def finish(state, acc, metrics):
            result = update(state["weights"], acc, state["round_num"], state["optimizer_state"])
            count = metrics["num_examples"]
            safe = tf.maximum(count, 1.0)
            nothing = tf.constant(float("nan"))  # no good client trained: no training loss to report
            round_metrics = collections.OrderedDict(
                loss=tf.where(count > 0, metrics["loss_sum"] / safe, nothing),
                accuracy=tf.where(count > 0, metrics["correct"] / safe, nothing), num_examples=count,
                kernel_coverage=result["coverage"], clients_trained=metrics["clients_trained"],
                clients_dropped=metrics["clients_dropped"])
            state = collections.OrderedDict(weights=result["weights"], round_num=state["round_num"] + 1,
                                            optimizer_state=result["optimizer_state"])
            return state, round_metrics

        return finish

    # --- the Python surface ---------------------------------------------------------------------------------
    def initialize(self):
        """The initial server state (the server model's weights, round 0)."""
        return self.learning_process.initialize()

    def get_model_weights(self, state) -> list[np.ndarray]:
        """The server model's weights in `prism_tf.submodel.flat_weights` order."""
        return [np.asarray(w) for w in state["weights"]]

    def set_model_weights(self, state, weights: Sequence[np.ndarray]):
        """A state with the server model's weights replaced (flat order), keeping the round counter."""
        if len(weights) != len(self.layout.tensors):
            raise ValueError(f"expected {len(self.layout.tensors)} weight arrays, got {len(weights)}")
        return collections.OrderedDict(weights=[np.asarray(w, np.float32) for w in weights],
                                       round_num=state["round_num"], optimizer_state=state["optimizer_state"])

    def assign_to(self, state, model: tf.keras.Model | None = None) -> tf.keras.Model:
        """Write the state's weights into ``model`` (default: the process's server model) and return it."""
        model = model or self.server_model
        prism_tf.submodel.set_flat_weights(model, self.get_model_weights(state))
        return model

    def round_num(self, state) -> int:
        return int(state["round_num"])

    def singular_values(self, state) -> dict[str, np.ndarray]:
        """Per principal layer, the server's current singular values (what sampling reads)."""
        weights = state["weights"]
        return {t.layer: np.asarray(weights[i]) for i, t in enumerate(self.layout.tensors)
                if t.weight == SERVER_ONLY}

    def selections(self, state, client_ids: Sequence[int] | int) -> list[prism_tf.Selection]:
        """This round's selections, one per client of ``client_ids`` (global ids; an int ``n`` means ``0..n-1``):
        `prism_tf.federated.methods.round_selections` on the state's singular values."""
        ids = range(client_ids) if isinstance(client_ids, int | np.integer) else client_ids
        return round_selections(self.method, self.plan, self.singular_values(state), self.seed,
                                self.round_num(state), list(ids), self.collective_clients)

    def client_inputs(self, layout: RoundLayout, datasets: Sequence[tf.data.Dataset],
                      selections: Sequence[prism_tf.Selection],
                      round_num: int | None = None) -> list[collections.OrderedDict]:
        """Each client's input struct ``<data, indices, scale>`` (`client_work.client_input_type`), plus ``lr`` =
        ``lr_schedule(round_num)`` when the process has a schedule (``round_num=None``: round 0, the base rate)."""
        extra = {}
        if self.lr_schedule is not None:
            extra["lr"] = np.float32(self.lr_schedule(0 if round_num is None else int(round_num)))
        inputs = []
        for dataset, selection in zip(datasets, selections, strict=True):
            indices, scale = layout.client_inputs(selection)
            inputs.append(collections.OrderedDict(data=dataset, indices=indices, scale=scale, **extra))
        return inputs

    def next(self, state, client_datasets: Sequence[tf.data.Dataset], client_ids: Sequence[int] | None = None, *,
             uploaded: prism_tf.server.Accumulator | None = None, uploaded_ids: Sequence[int] = ()):
        """One round over ``client_datasets`` (batched, fixed batch size); returns ``(state, metrics)``.

        ``client_ids``: the clients' global ids (default ``0..n-1``), which fix each device's capacity and seed
        its sampling (`selections`).

        ``uploaded``: updates of this round's clients ``uploaded_ids`` that trained elsewhere (phones, through
        `export.ingest`), accumulated by `prism_tf.server.Accumulator`; they join the simulated clients' sums
        before the one server step. Selections are drawn over all of the round's clients, simulated and uploaded
        (``collective``'s ``C`` counts both); ``client_datasets`` may then be empty.

        Faulty clients (docs/design.md, faulty clients): a client whose update or metrics hold NaN/Inf is dropped
        inside the aggregation; a client whose training raises makes the round's computation fail, and the round
        is then run one client at a time, leaving out the clients that fail alone. With fewer than
        ``min_clients`` good clients (device uploads count) the round is skipped: the returned state is the
        previous one with only its round counter advanced.

        Metrics: ``loss``, ``accuracy``, ``num_examples`` (the good clients' training), ``kernel_coverage`` (share
        of all principal kernels trained by some good client; 0 when skipped), the per-client traffic and cost of
        this round's sub-models, ``clients_dropped``, ``failed_clients`` (ids whose training raised), ``failure``
        (the first one's error), ``skipped`` and ``skip_reason``.
        """
        if not client_datasets and uploaded is None:
            raise ValueError("next: no client datasets")
        for i, dataset in enumerate(client_datasets):
            self._check_dataset(i, dataset)
        if client_ids is not None and len(client_ids) != len(client_datasets):
            raise ValueError(f"next: {len(client_ids)} client ids for {len(client_datasets)} client datasets")
        ids = list(range(len(client_datasets))) if client_ids is None else [int(c) for c in client_ids]
        devices = [int(c) for c in uploaded_ids] if uploaded is not None else []
        everyone = self.selections(state, ids + devices)
        selections = everyone[:len(ids)]
        tiers = self._tiers(selections)
        new_state = None
        if uploaded is None and list(tiers) == [self.layout.sizes_key]:
            inputs = self.client_inputs(self.layout, client_datasets, selections, self.round_num(state))
            try:
                output = self.learning_process.next(state, inputs)
                new_state, metrics = output.state, dict(output.metrics)
            except Exception as error:  # only a client's failure is handled here, anything else re-raised
                if not client_failure(error):
                    raise
        if new_state is None:  # mixed sizes, devices, or a client failed the fused round: phase by phase
            new_state, metrics = self._next_in_tiers(state, client_datasets, selections, tiers, uploaded,
                                                     isolate=uploaded is None and len(tiers) == 1)
        failed = metrics.pop("failed", [])
        good = int(round(float(metrics.pop("clients_trained")))) + len(devices)
        metrics["clients_dropped"] = int(round(float(metrics["clients_dropped"]))) + len(failed)
        metrics["failed_clients"] = [ids[i] for i, _ in failed]
        metrics["failure"] = failed[0][1] if failed else None
        metrics["skipped"], metrics["skip_reason"] = False, None
        if good < self.min_clients:
            new_state = self.unchanged(state)
            metrics.update(kernel_coverage=0.0, skipped=True, skip_reason=(
                f"{good} of {len(everyone)} clients delivered a usable update, fewer than min_clients="
                f"{self.min_clients}: the server state is unchanged"))
        if uploaded is not None and not selections:  # only devices: no training loss reached the server
            metrics.update(loss=float("nan"), accuracy=float("nan"))
        metrics.update(dataclasses.asdict(self._report(everyone, self._tiers(everyone))))
        if uploaded is not None:
            metrics["uploaded_clients"] = len(devices)
        return new_state, {k: _py(v) for k, v in metrics.items()}

    def unchanged(self, state):
        """``state`` after a skipped round: the same weights and server optimizer state, round counter + 1 (the
        round's clients, seeds and learning-rate slot were spent; docs/design.md, faulty clients)."""
        return collections.OrderedDict(weights=state["weights"], round_num=np.int64(self.round_num(state) + 1),
                                       optimizer_state=state["optimizer_state"])

    def _tiers(self, selections: Sequence[prism_tf.Selection]) -> dict[tuple, list[int]]:
        """Clients grouped by sub-model size (one traced client computation per size)."""
        tiers: dict[tuple, list[int]] = {}
        sliced = self._default_sizes()
        for i, selection in enumerate(selections):
            sizes = self.plan.sizes(selection.indices())
            tiers.setdefault(_key({g: sizes[g] for g in sliced}), []).append(i)
        return tiers

    def _check_dataset(self, i: int, dataset: tf.data.Dataset) -> None:
        expected = {k: tuple(self.element_type[k].shape) for k in ("x", "y")}
        spec = getattr(dataset, "element_spec", None)
        if not isinstance(spec, dict) or set(spec) != set(expected):
            raise ValueError(f"client dataset {i}: elements must be dicts with keys {sorted(expected)}, got {spec}")
        for key, shape in expected.items():
            got = tuple(spec[key].shape)
            if got != shape:
                hint = " (batch with drop_remainder=True)" if got[:1] == (None,) else ""
                raise ValueError(f"client dataset {i}: '{key}' batches have shape {got}, this process expects "
                                 f"{shape}{hint}")

    def _next_in_tiers(self, state, datasets, selections, tiers, uploaded=None, *, isolate: bool = False):
        """Client phases per sub-model size, then the one server step of `next_fn`: ``(state, metrics)``.

        A phase whose computation fails because of a client (`client_failure`) is re-run one client at a time
        (at once with ``isolate``: the fused round already failed); the clients that fail alone are left out
        and ``metrics["failed"]`` lists ``(position in datasets, error)`` of each.
        """
        zeros = [np.zeros(self.layout.tensors[p].shape, np.float32) for p in self.layout.travelling()]
        acc = _accumulator(zeros, zeros)
        metrics = collections.OrderedDict((k, np.float32(0)) for k in PHASE_METRICS)
        if uploaded is not None:  # devices' updates: their sums join the round's (metrics are the simulated ones)
            acc = _accumulator(uploaded.sums, uploaded.counts)
        weights, failed = state["weights"], []
        for key, members in tiers.items():
            layout = self._layout(key)
            inputs = self.client_inputs(layout, [datasets[i] for i in members], [selections[i] for i in members],
                                        self.round_num(state))
            for part, tier_acc, tier_metrics in self._run_phase(key, weights, inputs, isolate):
                if tier_acc is None:  # tier_metrics: the error
                    failed.append((members[part], tier_metrics))
                    continue
                acc = _add(acc, _accumulator(tier_acc["sums"], tier_acc["counts"]))
                metrics = _add(metrics, collections.OrderedDict((k, np.float32(tier_metrics[k]))
                                                                for k in PHASE_METRICS))
        state, round_metrics = self._finish(state, acc, metrics)  # the same server step as `next_fn`
        return state, {**round_metrics, "failed": sorted(failed)}

    def _run_phase(self, key: tuple, weights, inputs: list, isolate: bool) -> list[tuple]:
        """``[(position, accumulator, metrics)]`` of the phase over ``inputs``: one item for all of them (position
        ``None``) or, when that fails because of a client, one per client, ``(i, None, error)`` for a failing one
        (``error``: the first line of its message)."""
        phase = self._phase(key)
        if not isolate:
            try:
                return [(None, *phase(weights, inputs))]
            except Exception as error:  # only a client's failure is handled here, anything else re-raised
                if not client_failure(error):
                    raise
        results = []
        for i, one in enumerate(inputs):  # in client order: the same sums, in the same order, on every re-run
            try:
                results.append((i, *phase(weights, [one])))
            except Exception as error:
                if not client_failure(error):
                    raise
                results.append((i, None, _first_line(error)))
        return results

    def _report(self, selections, tiers) -> RoundReport:
        down = up = flops = act = 0.0
        for key, members in tiers.items():
            layout = self._layout(key)
            cost = self._submodel_cost(key)
            n = len(members)
            down += n * layout.bytes_down()
            up += n * layout.bytes_up()
            flops += n * cost["flops"]
            act += n * cost["activation_bytes"]
        n = len(selections)
        return RoundReport(down / n, up / n, flops / n, act / n, n)


def client_failure(error: BaseException) -> bool:
    """Whether ``error`` is a computation failing inside TensorFlow (a client's data or training raised), as
    opposed to the TFF worker being gone (`tff_pipelines.workers.runtime` raises `RuntimeError`) or a bug in Python.

    The local worker reports a failed computation as a gRPC ``INTERNAL`` status; an in-process context raises the
    TensorFlow error itself.
    """
    if isinstance(error, grpc.RpcError):
        return error.code() == grpc.StatusCode.INTERNAL
    return isinstance(error, tf.errors.OpError)


def _first_line(error: BaseException) -> str:
    text = error.details() if isinstance(error, grpc.RpcError) else getattr(error, "message", str(error))
    line = (text or type(error).__name__).strip().splitlines()[0]
    return line.removeprefix("Failed to run computation: ").strip()


def _add(a, b):
    return tf.nest.map_structure(np.add, a, b)


def _accumulator(sums, counts) -> collections.OrderedDict:
    return collections.OrderedDict(sums=[np.asarray(v, np.float32) for v in sums],
                                   counts=[np.asarray(v, np.float32) for v in counts])


def _key(sizes: dict[str, int]) -> tuple:
    return tuple(sorted(sizes.items()))


def _py(value):
    array = np.asarray(value)
    return array.item() if array.shape == () else array.tolist()


def batch_spec(input_shape: Sequence[int], batch_size: int) -> tff.Type:
    """The TFF type of a client batch: ``<x=float32[B, H, W, C], y=int32[B]>`` (fixed batch size)."""
    return tff.to_type(collections.OrderedDict(
        x=tff.TensorType(np.float32, [batch_size, *input_shape]), y=tff.TensorType(np.int32, [batch_size])))


def build_prism_process(
    model_fn: Callable[[], tf.keras.Model],
    *,
    method: str | Method = "prism",
    keep_ratio: float = 0.2,
    strategy: str = "prism",
    gamma: float | None = None,
    output_keep: float | None = None,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 32,
    client_optimizer: tff.learning.optimizers.Optimizer | None = None,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
    clip_norm: float | None = 5.0,
    clip_lr_tau: float | None = 10.0,
    distribution: str = "select",
    refactorize_every: int = 1,
    weighting: str = "examples",
    seed: int = 0,
    collective_clients: int | None = None,
    factorize_options: dict | None = None,
    keep_mix: Sequence[tuple[float, float]] | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    frobenius_decay: float = 0.0,
    weight_decay: float = 0.0,
    min_clients: int = 1,
) -> PrismProcess:
    """Build the federated process for PriSM (or a peer method, `prism_tf.federated.methods`).

    Args:
      model_fn: returns a fresh functional/Sequential Keras model (the full server model, unfactorized).
      method: ``prism`` (default), ``fedhm``, ``fedavg``, ``small``, ``heterofl``, ``fjord``, ``fed_dropout``
        or a `Method`.
      keep_ratio: share of each layer's principal kernels (or channels) a client trains (docs/algorithm.md §2).
      strategy: sampling strategy (`prism_tf.STRATEGIES`).
      gamma: PriSM's exponent; default 4 at keep ≤ 0.2 else 2.5.
      output_keep: memory-efficient variant (docs/algorithm.md §2): share of owned output channels kept.
      input_shape: per-example input shape (default: the model's).
      batch_size: client batch size; client datasets must be batched with exactly this size
        (``drop_remainder=True``: TF 2.14 on these CPUs corrupts memory with varying batch shapes,
        docs/pitfalls.md, "oneDNN and batch shapes").
      client_optimizer: a `tff.learning.optimizers.Optimizer` (default SGD lr 0.05, momentum 0.9).
      server_optimizer: ``None`` (plain per-entry averaging, the default) or a `tff.learning.optimizers.Optimizer`
        acting on the rebuilt kernels (`finalizer`; requires ``refactorize_every=1``).
      clip_norm, clip_lr_tau: see `client_work.ClientTraining`.
      distribution: ``select`` (per-client `tff.federated_select`) or ``broadcast`` (simulation shortcut).
      refactorize_every: re-run the SVD every this many rounds (docs/algorithm.md §1; 0 = never).
      weighting: ``examples`` (weight clients by examples trained) or ``uniform`` (the authors' choice).
      seed: run seed; client ``c`` of round ``t`` samples with seed ``(seed, t, c)``.
      collective_clients: ``C`` of the ``collective`` strategy (default: the clients of the round).
      factorize_options: keyword arguments of `prism_tf.factorize`.
      keep_mix: per-client keep ratios ``((ratio, share), ...)`` for heterogeneous devices (`Method.keep_mix`).
      lr_schedule: the clients' learning rate per round, ``round_num -> lr`` (e.g. `prism_tf.federated.recipe.Schedule`,
        the authors' cosine from 0.1 to 1e-4); it travels in each client's input as ``lr`` and overrides the client
        optimizer's ``learning_rate``. ``None`` (default): the optimizer's own constant rate.
      frobenius_decay, weight_decay: see `client_work.ClientTraining` (the authors use λ = 2e-4…5e-4; default 0).
      min_clients: a round with fewer good clients (finite update, training did not raise) keeps the server
        state (`PrismProcess.next`; docs/design.md, faulty clients).
    """
    if not isinstance(method, Method):
        method = Method(method, keep_ratio=keep_ratio, strategy=strategy, gamma=gamma, output_keep=output_keep,
                        keep_mix=tuple(tuple(m) for m in keep_mix) if keep_mix else None)
    check_batch_size(batch_size)
    model = model_fn()
    if method.spectral:
        model = prism_tf.factorize(model, **(factorize_options or {}))
    shape = tuple(input_shape) if input_shape is not None else tuple(model.inputs[0].shape[1:])
    training = client_work.ClientTraining(
        optimizer=client_optimizer or client_work.ClientTraining().optimizer, clip_norm=clip_norm,
        clip_lr_tau=clip_lr_tau, frobenius_decay=frobenius_decay, weight_decay=weight_decay)
    return PrismProcess(model, method, batch_spec(shape, batch_size), training, distribution=distribution,
                        refactorize_every=refactorize_every, weighting=weighting, seed=seed,
                        collective_clients=collective_clients, server_optimizer=server_optimizer,
                        lr_schedule=lr_schedule, min_clients=min_clients)
