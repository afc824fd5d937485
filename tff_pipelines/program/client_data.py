"""The run's training set as a TFF ``ClientData``: one client dataset per part of
`prism_tf.federated.data.client_indices` (docs/design.md: the TFF-free data loading stays in
`prism_tf.federated.data` and `prism_tf.federated.sequences`).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from prism_tf.federated.data import PIXEL_MAX, ImageDataset, client_indices
from prism_tf.federated.sequences import SequenceDataset

__all__ = ["make_client_data"]


def make_client_data(
    ds: ImageDataset | SequenceDataset,
    num_clients: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    examples_per_client: int | None = None,
) -> tff.simulation.datasets.ClientData:
    """Partition ``ds``'s training set (see :func:`client_indices`: a `partition` scheme or ``natural``) into a TFF
    ``ClientData``.

    Client ids are ``"0" .. str(num_clients - 1)``; client ``i`` holds ``client_indices(...)[i]`` (same
    arguments), in that order. Each client dataset yields unbatched ``OrderedDict(x, y)``: images as
    ``x=float32[H, W, C]`` in ``[0, 1]``, ``y=int32[]``; sequences as stored (``x=int32[T]`` token ids or
    ``float32[T, F]`` features, ``y=int32[]`` or ``int32[T]`` next tokens). Built with
    ``ClientData.from_clients_and_tf_fn``: the dataset function is traceable (``dataset_computation`` works);
    only the images used by some client are embedded in it.
    """
    parts = client_indices(ds, num_clients, scheme, seed=seed, examples_per_client=examples_per_client)
    images = isinstance(ds, ImageDataset)
    used = np.concatenate(parts)
    splits = np.zeros(num_clients + 1, dtype=np.int64)
    splits[1:] = np.cumsum([len(p) for p in parts])
    x_np = np.ascontiguousarray(ds.x_train[used])
    y_np = ds.y_train[used].astype(np.int32)
    captured: list[tf.Tensor] = []  # eager copies, made once, captured by tf.function traces

    def scale(x: tf.Tensor, y: tf.Tensor) -> collections.OrderedDict:
        # Pixels to [0, 1]; token ids stay int32 (an Embedding's input), features stay float32.
        return collections.OrderedDict(x=tf.cast(x, tf.float32) / PIXEL_MAX if images else x, y=y)

    def dataset_fn(client_id: str | tf.Tensor) -> tf.data.Dataset:
        if tf.executing_eagerly():  # create_tf_dataset_for_client: slice in numpy, copy one client only
            cid = client_id.numpy() if isinstance(client_id, tf.Tensor) else client_id
            i = int(cid)
            start, stop = splits[i], splits[i + 1]
            return tf.data.Dataset.from_tensor_slices((x_np[start:stop], y_np[start:stop])).map(scale)
        if tf.inside_function():  # tf.function / Dataset.flat_map traces: capture eager tensors
            if not captured:
                with tf.init_scope():
                    captured.extend([tf.constant(x_np), tf.constant(y_np), tf.constant(splits)])
            x_all, y_all, bounds = captured
        else:  # a plain graph (TFF's dataset_computation): the data become graph constants
            x_all, y_all, bounds = tf.constant(x_np), tf.constant(y_np), tf.constant(splits)
        i = tf.strings.to_number(client_id, out_type=tf.int32)
        start, stop = bounds[i], bounds[i + 1]
        return tf.data.Dataset.from_tensor_slices((x_all[start:stop], y_all[start:stop])).map(scale)

    return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
        [str(i) for i in range(num_clients)], dataset_fn
    )
