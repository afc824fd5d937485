"""The aggregator as a TFF process on a tiny model: per-entry weighted sums and counts of client uploads at their
indices, the metric totals, and faulty clients dropped from both (docs/algorithm.md §3; docs/design.md, faulty
clients)."""

import numpy as np
import pytest
import round_models
import tensorflow_federated as tff

from tff_pipelines.round import aggregator
from tff_pipelines.round.layout import ClientMetrics, ClientUpdate, EntrySums, TrainingTotals


@pytest.fixture(scope="module")
def layout():
    return round_models.dense_layout()


@pytest.fixture(scope="module")
def process(layout):
    f32 = np.float32
    update_type = ClientUpdate([tff.TensorType(f32, layout.sub_shape(p)) for p in layout.travelling()],
                               layout.indices_type(), ClientMetrics(*[tff.TensorType(f32)] * 3))
    return aggregator.build_aggregator(layout, update_type)


def _update(layout, kernels, a_columns, other, metrics):
    """A client's update: A's sub-matrix has column j = ``a_columns[j]``, B's row j = ``10·a_columns[j]``, every
    other upload ``other``."""
    a = np.tile(np.asarray(a_columns, np.float32), (5, 1))
    b = np.tile(10 * np.asarray(a_columns, np.float32)[:, None], (1, 4))
    rest = [np.full(layout.sub_shape(p), other, np.float32) for p in layout.travelling()[2:]]
    return ClientUpdate([a, b, *rest], [np.array(kernels, np.int32)], ClientMetrics(*map(np.float32, metrics)))


def test_the_type_signature(process):
    assert isinstance(process, tff.templates.AggregationProcess) and process.is_weighted
    assert str(process.next.type_signature) == (
        "(<state=<>@SERVER,updates={<uploads=<float32[5,2],float32[2,4],float32[4],float32[4,3],float32[3]>,"
        "indices=<int32[2]>,metrics=<num_examples=float32,loss_sum=float32,correct=float32>>}@CLIENTS,"
        "weights={float32}@CLIENTS> -> <state=<>@SERVER,result=<sums=<float32[5,4],float32[4,4],float32[4],"
        "float32[4,3],float32[3]>,counts=<float32[5,4],float32[4,4],float32[4],float32[4,3],float32[3]>>@SERVER,"
        "measurements=<num_examples=float32,loss_sum=float32,correct=float32,clients_trained=float32,"
        "clients_dropped=float32>@SERVER>)")


def test_per_kernel_sums_and_counts_by_hand(layout, process):
    # client 0: kernels (3, 1), weight 2; client 1: kernels (1, 0), weight 1; nobody has kernel 2
    updates = [_update(layout, [3, 1], [1.0, 2.0], 1.0, (2, 1.0, 1)),
               _update(layout, [1, 0], [10.0, 20.0], 4.0, (1, 0.5, 0))]
    out = process.next(process.initialize(), updates, [np.float32(2), np.float32(1)])
    assert isinstance(out.result, EntrySums) and isinstance(out.measurements, TrainingTotals)
    sums, counts = out.result
    a_sums = np.array([20.0, 2 * 2.0 + 10.0, 0.0, 2 * 1.0], np.float32)  # per kernel: Σ w·column
    a_counts = np.array([1.0, 3.0, 0.0, 2.0], np.float32)  # Σ w over the clients that had the kernel
    np.testing.assert_array_equal(sums[0], np.tile(a_sums, (5, 1)))
    np.testing.assert_array_equal(counts[0], np.tile(a_counts, (5, 1)))
    np.testing.assert_array_equal(sums[1], np.tile(10 * a_sums[:, None], (1, 4)))
    np.testing.assert_array_equal(counts[1], np.tile(a_counts[:, None], (1, 4)))
    for s, c, p in zip(sums[2:], counts[2:], layout.travelling()[2:], strict=True):  # whole tensors: FedAvg's sums
        np.testing.assert_array_equal(s, np.full(layout.tensors[p].shape, 2 * 1.0 + 1 * 4.0))
        np.testing.assert_array_equal(c, np.full(layout.tensors[p].shape, 3.0))
    assert tuple(float(v) for v in out.measurements) == (3.0, 1.5, 1.0, 2.0, 0.0)
    assert out.state == ()


@pytest.mark.parametrize("fault", ["nan_upload", "inf_weight", "nan_loss"])
def test_a_non_finite_client_is_dropped_from_sums_and_metrics(layout, process, fault):
    good = _update(layout, [3, 1], [1.0, 2.0], 1.0, (2, 1.0, 1))
    bad = _update(layout, [1, 2], [5.0, 6.0], 7.0, (4, np.nan if fault == "nan_loss" else 3.0, 2))
    if fault == "nan_upload":
        bad.uploads[3][0, 0] = np.nan
    weights = [np.float32(2), np.float32(np.inf if fault == "inf_weight" else 4)]
    alone = process.next(process.initialize(), [good], weights[:1])
    faulty = process.next(process.initialize(), [good, bad], weights)
    for x, y in zip([*alone.result.sums, *alone.result.counts], [*faulty.result.sums, *faulty.result.counts],
                    strict=True):
        np.testing.assert_array_equal(x, y)  # zero values, zero weight, zero count: bit for bit the good client's
    assert tuple(float(v) for v in faulty.measurements) == (2.0, 1.0, 1.0, 1.0, 1.0)
