"""The distributors as TFF processes on a tiny model: what each client receives, row by row, against the server
weights; select and broadcast deliver the same sub-model; the template's type checks."""

import collections

import numpy as np
import pytest
import round_models
import tensorflow as tf
import tensorflow_federated as tff

from tff_pipelines.round import client_work, distributor
from tff_pipelines.round.layout import ClientAssignment, Received, RoundLayout


@pytest.fixture(scope="module")
def layout():
    return round_models.dense_layout()


def _weights(layout):
    """Server weights whose every entry is distinct: tensor p holds 100·p + 0, 1, 2, ..."""
    return [(100 * p + np.arange(int(np.prod(t.shape)))).reshape(t.shape).astype(np.float32)
            for p, t in enumerate(layout.tensors)]


ASSIGNMENTS = [ClientAssignment([np.array([3, 1], np.int32)], [np.ones(2, np.float32)]),
               ClientAssignment([np.array([0, 2], np.int32)], [np.full(2, 2.0, np.float32)])]


def _rows(value) -> np.ndarray:
    return np.stack([np.asarray(r) for r in value])  # a dataset (or list) of rows, in key order


def test_select_sends_each_client_its_kernels_rows(layout):
    process = distributor.build_select_distributor(layout)
    assert isinstance(process, distributor.SubmodelDistributionProcess)
    assert str(process.next.type_signature) == (
        "(<state=<>@SERVER,weights=<float32[5,4],float32[4,4],float32[4],float32[4],float32[4],float32[4,3],"
        "float32[3]>@SERVER,assignments={<indices=<int32[2]>,scale=<float32[2]>,lr=<>>}@CLIENTS> -> "
        "<state=<>@SERVER,result={<rows=<float32[9]*>,whole=<float32[4],float32[4,3],float32[3]>>}@CLIENTS,"
        "measurements=<>@SERVER>)")
    weights = _weights(layout)
    a, b = weights[0], weights[1]
    out = process.next(process.initialize(), weights, ASSIGNMENTS)
    assert len(out.result) == 2 and out.measurements == ()
    for received, assignment in zip(out.result, ASSIGNMENTS, strict=True):
        kernels = assignment.indices[0]
        # a row: the kernel's column of A (5 numbers), then its row of B (4)
        expected = np.stack([np.concatenate([a[:, k], b[k, :]]) for k in kernels])
        np.testing.assert_array_equal(_rows(received.rows[0]), expected)
        for got, position in zip(received.whole, [2, 5, 6], strict=True):  # hidden bias, head kernel, head bias
            np.testing.assert_array_equal(got, weights[position])


def test_broadcast_sends_every_travelling_tensor_and_the_same_submodel_results(layout):
    weights = _weights(layout)
    broadcast = distributor.build_broadcast_distributor(layout)
    select = distributor.build_select_distributor(layout)
    assert broadcast.next.type_signature.result.result.all_equal  # one value, the same at every client
    whole = broadcast.next(broadcast.initialize(), weights, ASSIGNMENTS).result
    assert isinstance(whole, Received) and len(whole.rows) == 0
    by_select = select.next(select.initialize(), weights, ASSIGNMENTS).result
    for rows, assignment in zip(by_select, ASSIGNMENTS, strict=True):
        for got, position in zip(whole.whole, layout.travelling(), strict=True):
            np.testing.assert_array_equal(got, weights[position])
        indices, scale = [tf.constant(assignment.indices[0])], [tf.constant(assignment.scale[0])]
        from_whole = client_work.materialize(layout, Received([], [tf.constant(w) for w in whole.whole]), indices,
                                             scale)
        from_rows = client_work.materialize(
            layout, Received([tf.constant(_rows(rows.rows[0]))], [tf.constant(w) for w in rows.whole]), indices,
            scale)
        for x, y, tensor in zip(from_whole, from_rows, layout.tensors, strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=f"{tensor.layer}/{tensor.weight}")
        # the sub-model: A's columns and B's rows of the client's kernels, in its order; ω from its assignment
        kernels = assignment.indices[0]
        np.testing.assert_array_equal(from_rows[0].numpy(), weights[0][:, kernels])
        np.testing.assert_array_equal(from_rows[1].numpy(), weights[1][kernels, :])
        np.testing.assert_array_equal(from_rows[4].numpy(), assignment.scale[0])


def test_select_without_principal_layers_is_the_broadcast(layout):
    plain = RoundLayout.build(round_models.dense_model(), {})  # FedAvg's: nothing to key
    process = distributor.build_select_distributor(plain)
    assert process.next.type_signature.result.result.member.rows == tff.to_type([])
    weights = _weights(plain)
    received = process.next(process.initialize(), weights, [ClientAssignment([], [])])
    for got, want in zip(received.result.whole, weights, strict=True):
        np.testing.assert_array_equal(got, want)


def test_named_and_the_templates_checks(layout):
    assert distributor.named("select") is distributor.build_select_distributor
    assert distributor.named("broadcast") is distributor.build_broadcast_distributor
    assert tuple(distributor.DISTRIBUTORS) == distributor.DISTRIBUTIONS
    with pytest.raises(ValueError, match=r"distribution must be one of \('select', 'broadcast'\), got 'carrier'"):
        distributor.named("carrier")

    @tff.federated_computation
    def initialize():
        return tff.federated_value((), tff.SERVER)

    weights_type = tff.FederatedType(layout.weights_type(), tff.SERVER)
    clients_type = tff.FederatedType(layout.assignment_type(round_lr=False), tff.CLIENTS)

    @tff.federated_computation(initialize.type_signature.result, weights_type)
    def two_arguments(state, weights):  # TFF's DistributionProcess: no assignments
        return tff.templates.MeasuredProcessOutput(state, tff.federated_broadcast(weights), state)

    with pytest.raises(TypeError, match="a distributor's next takes <state@SERVER, weights@SERVER, "
                                        "assignments@CLIENTS>"):
        distributor.SubmodelDistributionProcess(initialize, two_arguments)

    @tff.federated_computation(initialize.type_signature.result, weights_type, clients_type)
    def kept_at_the_server(state, weights, assignments):
        del assignments
        return tff.templates.MeasuredProcessOutput(state, weights, state)

    with pytest.raises(TypeError, match="a distributor's result must be placed at CLIENTS, got"):
        distributor.SubmodelDistributionProcess(initialize, kept_at_the_server)

    @tff.federated_computation(initialize.type_signature.result, weights_type, weights_type)
    def assignments_at_the_server(state, weights, other):
        del other
        return tff.templates.MeasuredProcessOutput(state, tff.federated_broadcast(weights), state)

    with pytest.raises(TypeError, match=r"a distributor's assignments \(3rd argument\) must be placed at CLIENTS"):
        distributor.SubmodelDistributionProcess(initialize, assignments_at_the_server)


def test_the_indices_key_federated_select_and_travel_on(layout):
    """Duplicate and reversed keys arrive as asked (federated_select delivers in key order, per client)."""
    process = distributor.build_select_distributor(layout)
    weights = _weights(layout)
    assignments = [ClientAssignment([np.array([2, 2], np.int32)], [np.ones(2, np.float32)]),
                   ClientAssignment([np.array([1, 0], np.int32)], [np.ones(2, np.float32)])]
    out = process.next(process.initialize(), weights, assignments).result
    a_rows = [_rows(received.rows[0])[:, :5] for received in out]
    np.testing.assert_array_equal(a_rows[0], weights[0][:, [2, 2]].T)
    np.testing.assert_array_equal(a_rows[1], weights[0][:, [1, 0]].T)
    assert collections.Counter(a_rows[0][:, 0].tolist()) == {2.0: 2}
