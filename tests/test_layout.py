"""`RoundLayout`: a round's fixed shapes, its traffic, its TFF types and the structures that cross the round's parts,
on two tiny models whose numbers are counted by hand."""

import numpy as np
import pytest
import round_models
import tensorflow as tf
import tensorflow_federated as tff

import prism_tf
from tff_pipelines.round.layout import NO_LR, ClientAssignment, ClientInput, EntrySums, Received, RoundLayout


@pytest.fixture(scope="module")
def spectral():
    return round_models.dense_layout()


def test_a_spectral_round_by_hand(spectral):
    layout = spectral
    names = [(t.layer, t.weight) for t in layout.tensors]
    assert names == [("hidden", "principal_kernels"), ("hidden", "combination"), ("hidden", "bias"),
                     ("hidden", "singular_values"), ("hidden", "kernel_scale"), ("head", "kernel"), ("head", "bias")]
    assert layout.groups == ("hidden",) and layout.scale_layers == ("hidden",) and layout.sizes["hidden"] == 2
    assert layout.sizes_key == (("hidden", 2),)
    assert layout.travelling() == [0, 1, 2, 5, 6]  # not s (the server's) nor ω (the client's, from its selection)
    assert [layout.sub_shape(i) for i in range(7)] == [(5, 2), (2, 4), (4,), (2,), (2,), (4, 3), (3,)]
    assert layout.trainable == (True, True, True, False, False, True, True)
    # A's columns and B's rows are the kernel group's table: a row is A[:, i] (5) then B[i, :] (4)
    assert layout.select_tables() == {"hidden": [0, 1]} and layout.row_width("hidden") == 9
    assert layout.kernel_axis(0) == (1, "hidden") and layout.kernel_axis(1) == (0, "hidden")
    assert layout.kernel_axis(5) is None
    # down: the travelling sub-tensors 10 + 8 + 4 + 12 + 3 = 37 floats, 2 indices, 2 ω; up: 37 + 3 metrics
    assert (layout.bytes_down(), layout.bytes_up()) == (4 * (37 + 4), 4 * (37 + 3))
    assert layout.full_bytes() == 4 * (20 + 16 + 4 + 12 + 3)


def test_a_width_round_by_hand():
    plain = round_models.conv_model()
    layout = RoundLayout.build(plain, {"stem:out": 2, "conv:out": 2})
    assert layout.groups == ("stem:out", "conv:out") and layout.scale_layers == ()
    assert layout.select_tables() == {}
    subs = [layout.sub_shape(i) for i in range(len(layout.tensors))]
    assert subs == [(3, 3, 2, 2), (2,), (2,), (2,), (2,), (2,), (3, 3, 2, 2), (2,), (2, 3), (3,)]
    # 36 + 2 + 8 (BatchNorm) + 36 + 2 + 6 + 3 = 93 floats and 2 + 2 indices down; 93 + 3 up
    assert (layout.bytes_down(), layout.bytes_up(), layout.full_bytes()) == (4 * 97, 4 * 96, 4 * 295)
    with pytest.raises(ValueError, match=r"unknown groups \['nope'\] for model"):
        RoundLayout.build(plain, {"nope": 1})


def test_assignment_from_a_selection(spectral):
    selection = prism_tf.Selection({"hidden": prism_tf.LayerSelection([3, 1], [2.0, 0.5], 4)}, 0.5, "unbiased")
    plain = spectral.assignment(selection)
    assert isinstance(plain, ClientAssignment) and plain.lr == NO_LR
    np.testing.assert_array_equal(plain.indices[0], np.array([3, 1], np.int32))
    assert plain.indices[0].dtype == np.int32 and plain.scale[0].dtype == np.float32
    np.testing.assert_array_equal(plain.scale[0], [2.0, 0.5])
    scheduled = spectral.assignment(selection, 0.25)
    assert scheduled.lr == np.float32(0.25) and scheduled.lr.dtype == np.float32


@pytest.mark.parametrize("layers,message", [
    ({}, r"selection has no indices for groups \['hidden'\]"),
    ({"hidden": prism_tf.LayerSelection([0, 1, 2], [1, 1, 1], 4)}, "group 'hidden': selection has 3 indices, this "
                                                                     "round expects 2"),
    ({"hidden": prism_tf.LayerSelection([0, 4], [1, 1], 4)}, r"group 'hidden': indices outside \[0, 4\)"),
])
def test_a_selection_that_does_not_fit_the_round_is_refused(spectral, layers, message):
    with pytest.raises(ValueError, match=message):
        spectral.assignment(prism_tf.Selection(layers, 0.5, "prism"))


def test_tff_types_of_the_structures(spectral):
    f32, i32 = np.float32, np.int32
    assert spectral.weights_type() == [tff.TensorType(f32, t.shape) for t in spectral.tensors]
    assert spectral.assignment_type(round_lr=False) == ClientAssignment([tff.TensorType(i32, [2])],
                                                                        [tff.TensorType(f32, [2])], NO_LR)
    assert spectral.assignment_type(round_lr=True).lr == tff.TensorType(f32)
    element = tff.to_type({"x": tff.TensorType(f32, [4, 5]), "y": tff.TensorType(i32, [4])})
    client = spectral.client_input_type(element, round_lr=True)
    assert isinstance(client, ClientInput) and client.data == tff.SequenceType(element)
    assert str(tff.to_type(client)) == ("<data=<x=float32[4,5],y=int32[4]>*,assignment=<indices=<int32[2]>,"
                                        "scale=<float32[2]>,lr=float32>>")
    selected = spectral.received_type(rows=True)
    assert isinstance(selected, Received)
    assert selected.rows == [tff.SequenceType(tff.TensorType(f32, [9]))]  # federated_select: a dataset of rows
    assert selected.whole == [tff.TensorType(f32, s) for s in ([4], [4, 3], [3])]  # bias, head kernel, head bias
    broadcast = spectral.received_type(rows=False)
    assert broadcast.rows == [] and len(broadcast.whole) == 5
    sums = spectral.entry_sums_type()
    assert isinstance(sums, EntrySums) and sums.sums == sums.counts == broadcast.whole  # full size per tensor


@pytest.mark.parametrize("lr", [NO_LR, 0.25])
def test_a_client_input_is_a_value_of_its_tff_type(spectral, lr):
    """What `assignment` builds is what a TFF computation typed by `client_input_type` takes (``lr``: an empty
    struct without a schedule)."""
    element = tff.to_type({"x": tff.TensorType(np.float32, [2, 5]), "y": tff.TensorType(np.int32, [2])})

    @tff.tensorflow.computation(spectral.client_input_type(element, round_lr=lr != NO_LR))
    def summary(client: ClientInput):
        batches = client.data.reduce(0.0, lambda n, _: n + 1.0)
        rate = client.assignment.lr if lr != NO_LR else tf.constant(-1.0)
        return (tf.cast(tf.reduce_sum(client.assignment.indices[0]), tf.float32),
                tf.reduce_sum(client.assignment.scale[0]), batches, rate)

    data = tf.data.Dataset.from_tensor_slices({"x": np.ones((6, 5), np.float32),
                                               "y": np.zeros(6, np.int32)}).batch(2, drop_remainder=True)
    selection = prism_tf.Selection({"hidden": prism_tf.LayerSelection([3, 1], [2.0, 0.5], 4)}, 0.5, "unbiased")
    got = summary(ClientInput(data, spectral.assignment(selection, lr)))
    assert [float(v) for v in got] == [4.0, 2.5, 3.0, 0.25 if lr != NO_LR else -1.0]
