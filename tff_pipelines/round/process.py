"""The PriSM federated process: four typed TFF template processes composed into a
`tff.learning.templates.LearningProcess` (docs/design.md, "The round as TFF templates").

One round (docs/algorithm.md §1-§3), all placements explicit:

1. the server's driver samples each client's `Selection` (`round_selections`, numpy) from the singular values in
   the server state and places it at the client with its data (`ClientInput`: data and `ClientAssignment`);
2. distributor (`distributor.SubmodelDistributionProcess`): ``federated_select`` (or broadcast) sends each
   client only its sub-model (`Received`);
3. client work (`tff.learning.templates.ClientWorkProcess`): the client rebuilds its sub-model, trains it locally
   and returns its sub-tensors (`ClientUpdate`) and weight;
4. aggregator (`tff.templates.AggregationProcess`): ``federated_aggregate`` sums every entry over the clients that
   trained it (`EntrySums`), and their metrics (`TrainingTotals`);
5. finalizer (`tff.learning.templates.FinalizerProcess`): the server finishes the averages, applies the server
   optimizer and re-factorizes.

Why the server samples (and not each client from a broadcast seed): the sampling laws, including the conditional
Poisson designs of ``unbiased``/``collective``, live once in numpy (`prism_tf.sampling`), the server needs each
client's indices anyway to route `federated_select`, and ``collective`` couples the clients of a round. The
assignment travels inside each client's input, which keeps ``next(state, client_data)`` the `LearningProcess`
signature (docs/pitfalls.md, processes and client inputs).

Why the parts are composed here and not by `tff.learning.templates.compose_learning_process`: see docs/design.md,
"The round as TFF templates" (the distributor needs the clients' assignments, the client inputs are not only
sequences, and heterogeneous sub-model sizes need the client phase and the server step apart). Heterogeneous
sub-model sizes (per-client keep ratios, FjORD's widths) change TFF types: `PrismProcess.next` groups clients by
size, runs one client phase (distributor, client work, aggregator) per group and the one finalizer over the summed
`EntrySums`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from prism_tf.federated.config import check_batch_size, onednn_enabled  # noqa: F401 (re-exported)
from prism_tf.federated.methods import Method, round_selections
from prism_tf.plan import SERVER_ONLY
from tff_pipelines.round import aggregator, client_work, distributor, finalizer
from tff_pipelines.round.layout import NO_LR, ClientInput, ClientStart, EntrySums, RoundLayout, TrainingTotals

# The Python API's defaults are the CLI's: `TrainConfig`'s field defaults, through the mapping the driver uses.
DEFAULTS = client_work.DEFAULTS
DEFAULT_LR_SCHEDULE = client_work.lr_schedule_of(DEFAULTS)
"""The CLI's default client learning rate per round (`TrainConfig`'s ``lr_schedule`` from ``client_lr`` to
``final_lr`` over its ``rounds``; later rounds stay at ``final_lr``)."""
DEFAULT_DISTRIBUTOR = distributor.named(DEFAULTS.distribution)
DEFAULT_WEIGHTING = client_work.client_weighting_of(DEFAULTS)


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

    ``learning_process`` is the `tff.learning.templates.LearningProcess` of the parts composed for the default
    sub-model size; its client argument is `ClientInput` (``<data, assignment=<indices, scale, lr>>``). `next`
    takes plain client datasets, samples each client's sub-model and runs the round (heterogeneous sizes: one
    client phase per size, `client_phase`, and the one `finish`). ``min_clients``: the fewest good clients a round
    of `next` needs (fewer: the round is skipped).

    The state is ``OrderedDict(weights, round_num, optimizer_state)`` at SERVER: the server model's weights in
    `prism_tf.submodel.flat_weights` order, and the finalizer's state (`finalizer.FinalizerState`) laid beside
    them. That is the checkpoint format (`prism_tf.federated.rundir` stores its leaves in this order and rebuilds
    dicts and lists), so runs written before keep loading; the distributor, client work and aggregator are
    stateless (checked: a stateful distributor would have nowhere to keep its state).

    Model weights: `get_model_weights` / `set_model_weights` (and ``learning_process``'s) use
    `tff.learning.models.ModelWeights` (trainable, non-trainable, each in flat order), as TFF's algorithms do;
    `flat_weights` / `set_flat_weights` give the flat list: every tensor of the server model in
    `prism_tf.submodel.flat_weights` order (what checkpoints, `prism_tf.server` and Keras' ``set_weights`` use).
    Both forms exist because the state keeps the flat order (the checkpoint format above), while
    ``learning_process`` follows TFF's convention for ``get_model_weights``.

    The TFF pieces: ``finalizer`` (`tff.learning.templates.FinalizerProcess`), `parts` (distributor, client work,
    aggregator of one sub-model size), `client_phase`, ``finish`` (``(<S, EntrySums, TrainingTotals>@SERVER ->
    <S, metrics>@SERVER>)``), ``initial_model_weights`` (no-arg computation of the initial flat weights, the
    composer's ``initial_model_weights_fn``) and ``learning_process``.
    """

    def __init__(
        self,
        server_model: tf.keras.Model,
        method: Method,
        element_type: tff.Type,
        training: client_work.ClientTraining,
        *,
        model_distributor: distributor.DistributorFn = DEFAULT_DISTRIBUTOR,
        client_weighting: tff.learning.ClientWeighting = DEFAULT_WEIGHTING,
        refactorize_every: int = DEFAULTS.refactorize_every,
        seed: int = DEFAULTS.seed,
        collective_clients: int | None = None,
        server_optimizer: tff.learning.optimizers.Optimizer | None = None,
        lr_schedule: Callable[[int], float] | None = DEFAULT_LR_SCHEDULE,
        min_clients: int = DEFAULTS.min_clients,
    ) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method must be a prism_tf.federated.methods.Method, got {method!r}")
        if not callable(model_distributor):
            raise TypeError("model_distributor must be a function (layout, assignment_type) -> "
                            f"SubmodelDistributionProcess, e.g. distributor.build_select_distributor; got "
                            f"{model_distributor!r}")
        if not isinstance(client_weighting, tff.learning.ClientWeighting):
            raise TypeError(f"client_weighting must be a tff.learning.ClientWeighting (NUM_EXAMPLES or UNIFORM), "
                            f"got {client_weighting!r}")
        if not (isinstance(min_clients, int | np.integer) and min_clients >= 1):
            raise ValueError(f"min_clients must be an integer >= 1, got {min_clients!r}")
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"lr_schedule must be a function round_num -> learning rate or None, got {lr_schedule!r}")
        self.server_model = server_model
        self.method = method
        self.element_type = element_type
        # With a schedule, clients read the round's learning rate from their assignment (`client_inputs`).
        self.lr_schedule = lr_schedule
        self.min_clients = int(min_clients)  # fewer good clients in a round: the round is skipped
        self.training = dataclasses.replace(training, round_lr=lr_schedule is not None)
        self.model_distributor = model_distributor
        self.client_weighting = client_weighting
        self.refactorize_every = refactorize_every if method.spectral else 0
        self.seed = int(seed)
        self.collective_clients = collective_clients
        self.server_optimizer = server_optimizer
        self.plan = prism_tf.SubmodelPlan.of(server_model)
        self.layout = self._layout(_key(self._default_sizes()))
        self.server_model_bytes = self._layout(()).full_bytes()  # the (factorized) server model's
        self.full_cost = prism_tf.cost(server_model)
        self.finalizer = finalizer.build_finalizer(self.layout, self.refactorize_every, server_optimizer)
        self.finish = self._build_finish()
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
    def parts(self, sizes_key: tuple) -> tuple[distributor.SubmodelDistributionProcess,
                                               tff.learning.templates.ClientWorkProcess,
                                               tff.templates.AggregationProcess]:
        """The distributor, client work and aggregator for one sub-model size (`RoundLayout.sizes_key`), built
        from one another's types as TFF's builders do."""
        layout = self._layout(sizes_key)
        assignment_type = layout.assignment_type(self.training.round_lr)
        distribute = self.model_distributor(layout, assignment_type)
        if not isinstance(distribute, distributor.SubmodelDistributionProcess):
            raise TypeError(f"model_distributor must return a SubmodelDistributionProcess, got {type(distribute)}")
        if not _is_empty(distribute.initialize.type_signature.result.member):
            raise ValueError("the distributor must be stateless (initialize returning <>@SERVER): the process state "
                             "holds only the weights, round_num and the server optimizer's state (checkpoint "
                             f"format); got {distribute.initialize.type_signature.result}")
        received_type = distribute.next.type_signature.result.result.member
        work = client_work.build_client_work(layout, self.element_type, self.training, received_type,
                                             self.client_weighting)
        aggregate = aggregator.build_aggregator(layout, work.next.type_signature.result.result.member.update)
        return distribute, work, aggregate

    @functools.lru_cache(maxsize=16)  # noqa: B019
    def client_phase(self, sizes_key: tuple) -> tff.Computation:
        """Distributor, client work and aggregator for one sub-model size, as one federated computation::

            (<W@SERVER, {ClientInput}@CLIENTS> -> <EntrySums@SERVER, TrainingTotals@SERVER>)
        """
        layout = self._layout(sizes_key)
        distribute, work, aggregate = self.parts(sizes_key)
        client_type = tff.FederatedType(layout.client_input_type(self.element_type, self.training.round_lr),
                                        tff.CLIENTS)

        @tff.federated_computation(tff.FederatedType(layout.weights_type(), tff.SERVER), client_type)
        def phase(weights, clients):
            sent = distribute.next(distribute.initialize(), weights, clients.assignment)
            start = tff.federated_zip(ClientStart(sent.result, clients.assignment))
            trained = work.next(work.initialize(), start, clients.data)
            # updates and metrics in one aggregation: one rule drops a faulty client from both
            summed = aggregate.next(aggregate.initialize(), trained.result.update, trained.result.update_weight)
            return summed.result, summed.measurements

        return phase

    def _build_finish(self) -> tff.Computation:
        """The finalizer and the round's metrics::

            (<S@SERVER, EntrySums@SERVER, TrainingTotals@SERVER> -> <S@SERVER, metrics@SERVER>)
        """
        layout, final = self.layout, self.finalizer
        initial = [w.numpy() for w in prism_tf.submodel.flat_weights(self.server_model)]

        @tff.tensorflow.computation
        def initial_weights():
            return [tf.constant(w) for w in initial]

        self.initial_model_weights = initial_weights
        final_state_type = final.initialize.type_signature.result.member

        @tff.tensorflow.computation(layout.weights_type(), final_state_type)
        def server_state(weights, state: finalizer.FinalizerState):
            return collections.OrderedDict(weights=weights, round_num=state.round_num,
                                           optimizer_state=state.optimizer_state)

        self._server_state = server_state
        state_type = server_state.type_signature.result

        @tff.tensorflow.computation(state_type)
        def finalizer_state(state):
            return finalizer.FinalizerState(state["round_num"], state["optimizer_state"])

        @tff.tensorflow.computation(state_type)
        def weights_of(state):
            return state["weights"]

        self._weights_of = weights_of
        totals_type = TrainingTotals(*(tff.TensorType(np.float32) for _ in TrainingTotals._fields))

        @tff.tensorflow.computation(totals_type, final.next.type_signature.result.measurements.member)
        def round_metrics(totals: TrainingTotals, measured):
            count = totals.num_examples
            safe = tf.maximum(count, 1.0)
            nothing = tf.constant(float("nan"))  # no good client trained: no training loss to report
            return collections.OrderedDict(
                loss=tf.where(count > 0, totals.loss_sum / safe, nothing),
                accuracy=tf.where(count > 0, totals.correct / safe, nothing), num_examples=count,
                kernel_coverage=measured["kernel_coverage"], clients_trained=totals.clients_trained,
                clients_dropped=totals.clients_dropped)

        @tff.federated_computation(tff.FederatedType(state_type, tff.SERVER),
                                   tff.FederatedType(layout.entry_sums_type(), tff.SERVER),
                                   tff.FederatedType(totals_type, tff.SERVER))
        def finish(state, sums, totals):
            out = final.next(tff.federated_map(finalizer_state, state), tff.federated_map(weights_of, state), sums)
            new_state = tff.federated_map(server_state, tff.federated_zip((out.result, out.state)))
            return new_state, tff.federated_map(round_metrics, tff.federated_zip((totals, out.measurements)))

        return finish

    def _build_learning_process(self) -> tff.learning.templates.LearningProcess:
        layout, final, finish = self.layout, self.finalizer, self.finish
        trainable = [i for i, t in enumerate(layout.trainable) if t]
        frozen = [i for i, t in enumerate(layout.trainable) if not t]
        initial_weights, server_state, weights_of = self.initial_model_weights, self._server_state, self._weights_of
        phase = self.client_phase(layout.sizes_key)

        @tff.federated_computation
        def initialize():
            weights = tff.federated_eval(initial_weights, tff.SERVER)
            return tff.federated_map(server_state, tff.federated_zip((weights, final.initialize())))

        @tff.federated_computation(initialize.type_signature.result, phase.type_signature.parameter[1])
        def next_fn(state, clients):
            sums, totals = phase(tff.federated_map(weights_of, state), clients)
            new_state, metrics = finish(state, sums, totals)
            return tff.learning.templates.LearningProcessOutput(new_state, metrics)

        state_type = initialize.type_signature.result.member

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

    # --- the Python surface ---------------------------------------------------------------------------------
    def initialize(self):
        """The initial server state (the server model's weights, round 0)."""
        return self.learning_process.initialize()

    def get_model_weights(self, state) -> tff.learning.models.ModelWeights:
        """The server model's weights as `tff.learning.models.ModelWeights` (numpy; what
        ``learning_process.get_model_weights`` returns), e.g. for ``ModelWeights.assign_weights_to(keras_model)``."""
        weights = self.flat_weights(state)
        return tff.learning.models.ModelWeights(
            trainable=[w for w, t in zip(weights, self.layout.trainable, strict=True) if t],
            non_trainable=[w for w, t in zip(weights, self.layout.trainable, strict=True) if not t])

    def set_model_weights(self, state, model_weights: tff.learning.models.ModelWeights):
        """A state with the server model's weights replaced by ``model_weights`` (trainable and non-trainable
        lists, as `get_model_weights` gives them), keeping the round counter and server-optimizer state."""
        trainable = list(model_weights.trainable)
        frozen = list(model_weights.non_trainable)
        want = sum(self.layout.trainable), len(self.layout.trainable) - sum(self.layout.trainable)
        if (len(trainable), len(frozen)) != want:
            raise ValueError(f"expected ModelWeights with {want[0]} trainable and {want[1]} non-trainable arrays, got "
                             f"{len(trainable)} and {len(frozen)}")
        weights = [trainable.pop(0) if t else frozen.pop(0) for t in self.layout.trainable]
        return self.set_flat_weights(state, weights)

    def flat_weights(self, state) -> list[np.ndarray]:
        """The server model's weights in `prism_tf.submodel.flat_weights` order (the state's ``weights``)."""
        return [np.asarray(w) for w in state["weights"]]

    def set_flat_weights(self, state, weights: Sequence[np.ndarray]):
        """A state with the server model's weights replaced (flat order), keeping the round counter and
        server-optimizer state."""
        if len(weights) != len(self.layout.tensors):
            raise ValueError(f"expected {len(self.layout.tensors)} weight arrays, got {len(weights)}")
        for i, (w, t) in enumerate(zip(weights, self.layout.tensors, strict=True)):
            if tuple(np.shape(w)) != tuple(t.shape):
                raise ValueError(f"weight {i} ({t.layer}/{t.weight}) has shape {tuple(np.shape(w))}, the server model "
                                 f"has {tuple(t.shape)}")
        return collections.OrderedDict(weights=[np.asarray(w, np.float32) for w in weights],
                                       round_num=state["round_num"], optimizer_state=state["optimizer_state"])

    def assign_to(self, state, model: tf.keras.Model | None = None) -> tf.keras.Model:
        """Write the state's weights into ``model`` (default: the process's server model) and return it."""
        model = model or self.server_model
        prism_tf.submodel.set_flat_weights(model, self.flat_weights(state))
        return model

    def round_index(self, state) -> int:
        """The 0-based index of the round `next` plays: the state's counter of rounds finished (skipped ones
        included), which the state keeps under its checkpointed key ``round_num``."""
        return int(state["round_num"])

    def singular_values(self, state) -> dict[str, np.ndarray]:
        """Per principal layer, the server's current singular values (what sampling reads)."""
        weights = state["weights"]
        return {t.group: np.asarray(weights[i]) for i, t in enumerate(self.layout.tensors)
                if t.role == SERVER_ONLY}

    def selections(self, state, client_ids: Sequence[int] | int) -> list[prism_tf.Selection]:
        """This round's selections, one per client of ``client_ids`` (global ids; an int ``n`` means ``0..n-1``):
        `prism_tf.federated.methods.round_selections` on the state's singular values."""
        ids = range(client_ids) if isinstance(client_ids, int | np.integer) else client_ids
        return round_selections(self.method, self.plan, self.singular_values(state), self.seed,
                                self.round_index(state), list(ids), self.collective_clients)

    def client_inputs(self, layout: RoundLayout, datasets: Sequence[tf.data.Dataset],
                      selections: Sequence[prism_tf.Selection], round_index: int | None = None) -> list[ClientInput]:
        """Each client's `ClientInput`: its data and `ClientAssignment` (index vectors, ω, and ``lr`` =
        ``lr_schedule(round_index)`` when the process has a schedule; ``round_index=None``: round 0, the base rate)."""
        lr: Any = NO_LR
        if self.lr_schedule is not None:
            lr = np.float32(self.lr_schedule(0 if round_index is None else int(round_index)))
        return [ClientInput(dataset, layout.assignment(selection, lr))
                for dataset, selection in zip(datasets, selections, strict=True)]

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
            inputs = self.client_inputs(self.layout, client_datasets, selections, self.round_index(state))
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
        return collections.OrderedDict(weights=state["weights"], round_num=np.int64(self.round_index(state) + 1),
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
        acc = _entry_sums(zeros, zeros)
        metrics = TrainingTotals(*(np.float32(0) for _ in TrainingTotals._fields))
        if uploaded is not None:  # devices' updates: their sums join the round's (metrics are the simulated ones)
            acc = _entry_sums(uploaded.sums, uploaded.counts)
        weights, failed = state["weights"], []
        for key, members in tiers.items():
            layout = self._layout(key)
            inputs = self.client_inputs(layout, [datasets[i] for i in members], [selections[i] for i in members],
                                        self.round_index(state))
            for part, tier_acc, tier_metrics in self._run_phase(key, weights, inputs, isolate):
                if tier_acc is None:  # tier_metrics: the error
                    failed.append((members[part], tier_metrics))
                    continue
                acc = _add(acc, _entry_sums(tier_acc.sums, tier_acc.counts))
                metrics = _add(metrics, TrainingTotals(*(np.float32(getattr(tier_metrics, k))
                                                         for k in TrainingTotals._fields)))
        state, round_metrics = self.finish(state, acc, metrics)  # the same server step as `learning_process.next`
        return state, {**round_metrics, "failed": sorted(failed)}

    def _run_phase(self, key: tuple, weights, inputs: list, isolate: bool) -> list[tuple]:
        """``[(position, accumulator, metrics)]`` of the phase over ``inputs``: one item for all of them (position
        ``None``) or, when that fails because of a client, one per client, ``(i, None, error)`` for a failing one
        (``error``: the first line of its message)."""
        phase = self.client_phase(key)
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


def _entry_sums(sums, counts) -> EntrySums:
    return EntrySums([np.asarray(v, np.float32) for v in sums], [np.asarray(v, np.float32) for v in counts])


def _is_empty(type_spec: tff.Type) -> bool:
    return isinstance(type_spec, tff.StructType) and len(type_spec) == 0


def _key(sizes: dict[str, int]) -> tuple:
    return tuple(sorted(sizes.items()))


def _py(value):
    array = np.asarray(value)
    return array.item() if array.shape == () else array.tolist()


def batch_spec(input_shape: Sequence[int], batch_size: int, input_dtype: np.dtype | str = np.float32,
               label_shape: Sequence[int] = ()) -> tff.Type:
    """The TFF type of a client batch: ``<x=float32[B, H, W, C], y=int32[B]>`` (fixed batch size); ``x`` is
    ``input_dtype`` (int32 for token ids: an `Embedding` model); ``y`` is ``int32[B, *label_shape]`` (``[B, T]``:
    a label per step, a next-token model)."""
    return tff.to_type(collections.OrderedDict(
        x=tff.TensorType(np.dtype(input_dtype), [batch_size, *input_shape]),
        y=tff.TensorType(np.int32, [batch_size, *label_shape])))


def build_prism_process(
    model_fn: Callable[[], tf.keras.Model],
    client_optimizer: tff.learning.optimizers.Optimizer | None = None,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
    *,
    method: Method | None = None,
    model_distributor: distributor.DistributorFn = DEFAULT_DISTRIBUTOR,
    client_weighting: tff.learning.ClientWeighting = DEFAULT_WEIGHTING,
    client_training: client_work.ClientTraining | None = None,
    lr_schedule: Callable[[int], float] | None = DEFAULT_LR_SCHEDULE,
    batch_size: int = DEFAULTS.batch_size,
    input_shape: Sequence[int] | None = None,
    refactorize_every: int = DEFAULTS.refactorize_every,
    seed: int = DEFAULTS.seed,
    collective_clients: int | None = None,
    factorize_options: dict | None = None,
    min_clients: int = DEFAULTS.min_clients,
) -> PrismProcess:
    """Build the federated process for PriSM (or a peer method, `prism_tf.federated.methods`), the way
    `tff.learning.algorithms.build_weighted_fed_avg` builds FedAvg: optimizers and parts are arguments
    (docs/design.md, "The round as TFF templates").

    Every default is the CLI's (`prism_tf.federated.config.TrainConfig`'s field defaults): ``build_prism_process(
    model_fn)`` trains what ``python -m tff_pipelines train`` trains with no flags, given the same model.

    Args:
      model_fn: returns a fresh functional/Sequential Keras model (the full server model, unfactorized).
      client_optimizer: the clients' `tff.learning.optimizers.Optimizer` (default ``client_training.optimizer``:
        the CLI's SGD, `client_work.client_optimizer_of`). With ``lr_schedule`` its ``learning_rate`` hparam is
        set every round.
      server_optimizer: ``None`` (plain per-entry averaging, the default) or a `tff.learning.optimizers.Optimizer`
        acting on the rebuilt kernels (`finalizer`; requires ``refactorize_every=1``).
      method: a `prism_tf.federated.methods.Method` (default ``TrainConfig().method_spec()``: the CLI's PriSM).
        Its ``spectral`` says whether the server model is factorized.
      model_distributor: ``(layout, assignment_type) -> distributor.SubmodelDistributionProcess``, built per
        sub-model size (default the CLI's, `distributor.build_select_distributor`: per-client `tff.federated_select`;
        `distributor.build_broadcast_distributor` is the simulation shortcut; `distributor.named` maps the CLI's
        names).
      client_weighting: `tff.learning.ClientWeighting`: ``NUM_EXAMPLES`` (default) or ``UNIFORM`` (1 per client
        that trained on any example; the authors' choice).
      client_training: the local step's options (`client_work.ClientTraining`: gradient clip, ClipLR τ, Frobenius
        and weight decay; default ``ClientTraining()``, the CLI's).
      lr_schedule: the clients' learning rate per round, ``round_num -> lr`` (e.g.
        `prism_tf.federated.recipe.Schedule`); it travels in each client's assignment as ``lr`` and overrides the
        client optimizer's ``learning_rate``.
        Default `DEFAULT_LR_SCHEDULE`, the CLI's (``--lr-schedule cosine`` over ``TrainConfig.rounds``: pass your
        own for another number of rounds); ``None``: the client optimizer's own constant rate (needed for an
        optimizer without a ``learning_rate`` hparam).
      batch_size: client batch size; client datasets must be batched with exactly this size
        (``drop_remainder=True``: TF 2.14 on these CPUs corrupts memory with varying batch shapes,
        docs/pitfalls.md, "oneDNN and batch shapes").
      input_shape: per-example input shape (default: the model's).
      refactorize_every: re-run the SVD every this many rounds (docs/algorithm.md §1; 0 = never).
      seed: run seed; client ``c`` of round ``t`` samples with seed ``(seed, t, c)``.
      collective_clients: ``C`` of the ``collective`` strategy (default: the clients of the round).
      factorize_options: keyword arguments of `prism_tf.factorize`.
      min_clients: a round with fewer good clients (finite update, training did not raise) keeps the server
        state (`PrismProcess.next`; docs/design.md, faulty clients).
    """
    if method is None:
        method = DEFAULTS.method_spec()
    if not isinstance(method, Method):
        raise TypeError(f"method must be a prism_tf.federated.methods.Method (e.g. Method('fedavg')), got {method!r}")
    training = client_training if client_training is not None else client_work.ClientTraining()
    if not isinstance(training, client_work.ClientTraining):
        raise TypeError(f"client_training must be a client_work.ClientTraining, got {training!r}")
    if client_optimizer is not None:
        training = dataclasses.replace(training, optimizer=client_optimizer)
    check_batch_size(batch_size)
    model = model_fn()
    if method.spectral:
        model = prism_tf.factorize(model, **(factorize_options or {}))
    shape = tuple(input_shape) if input_shape is not None else tuple(model.inputs[0].shape[1:])
    dtype = np.dtype(model.inputs[0].dtype.as_numpy_dtype)
    labels = tuple(model.outputs[0].shape[1:-1])  # logits [B, ..., classes]: a label per position before classes
    return PrismProcess(
        model, method, batch_spec(shape, batch_size, dtype, labels), training, model_distributor=model_distributor,
        client_weighting=client_weighting, refactorize_every=refactorize_every, seed=seed,
        collective_clients=collective_clients, server_optimizer=server_optimizer, lr_schedule=lr_schedule,
        min_clients=min_clients)
