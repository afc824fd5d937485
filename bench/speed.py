"""Speed and memory against their floors: a client's step, one client's memory, a TFF round, the server step.

    .venv/bin/python bench/speed.py                   # make bench-speed, the full profile (<= 20 minutes, 2 cores)
    .venv/bin/python bench/speed.py --profile quick   # about 3 minutes: width 16, keep 0.2, tiny rounds
    .venv/bin/python bench/speed.py --only keras_step,memory

Every figure is a ratio of two configurations measured in the same process (or, for memory, subprocesses started
one after the other), interleaved: each repeat runs every configuration once, in a shuffled order, and a figure is
the median over repeats. The machine is shared, so wall times are noisy; every timing is also recorded as the CPU
time of this process and its children (the TFF worker), which waiting for a core does not inflate (the README
shows both).

Sections (each resumable: a finished unit is kept in ``results.json`` and skipped on the next run):

- ``keras_step``: one training step (SGD with momentum, batch 32) of the keep-0.1/0.2/0.4 sub-models, the
  ``output_keep`` variant, the rank rounded up to a multiple of 8 and the equal-flops width baseline, against the
  full model, plain Keras in a ``tf.function``;
- ``tff_step``: the same steps inside the TFF client computation
  (`tff_pipelines.round.client_work.build_client_training`, called with datasets of two lengths: the slope is the
  per-step time, the intercept what TFF adds per client);
- ``memory``: one client's training in a subprocess, after one warm-up step: peak RSS over what the process held
  before the measured steps, and ``tf.config.experimental.get_memory_info`` where TensorFlow reports it;
- ``rounds``: PriSM rounds (``select`` and ``broadcast``) and FedAvg rounds at the bench settings
  (`bench/accuracy.py`, profile full: 5 clients of 400 examples, 2 local epochs, batch 32) against the same
  clients' local training in plain Keras (one traced step per sub-model shape); rounds per hour;
- ``server``: the server step (`prism_tf.server.finish_round`, aggregation finish + re-factorization) as a
  ``tf.function``, its SVD in float64 against float32 (time and accuracy), as a share of a round;
- ``precision``: ``mixed_bfloat16`` against ``float32`` (`prism_tf.precision`, ``--precision``): plain-Keras steps
  and TFF client-computation steps at widths 16 and 64, one client's peak memory, and whole TFF rounds (PriSM
  select and FedAvg) at width 16, each pair interleaved in one process;
- ``precision_ops``: where the time of a bf16 step goes, per op type (TensorFlow's step statistics of one
  graph-mode training step, float32 and bf16 traced alternately), for the full model and PriSM keep 0.2 at widths 16
  and 64, with the weight-gradient ops where bf16 loses most; and the same 3x3 convolution step (forward, both
  gradients) run by TFF's worker and by this process, float32 against bf16, to tell the worker's kernels from the
  model's graph.

Writes ``bench/results/speed/`` (``--profile quick``: ``bench/results/speed/quick/``): ``results.json`` and
``README.md`` (tables against the targets of the speed issue).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "speed"
BATCH = 32
INPUT = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    widths: tuple[int, ...]
    keeps: tuple[float, ...]
    step_repeats: int  # single steps per configuration, round-robin
    tff_repeats: int
    tff_batches: tuple[int, int]  # short and long client datasets (batches)
    memory_widths: tuple[int, ...]
    memory_repeats: int
    memory_steps: int
    round_clients: int
    round_examples: int
    round_epochs: int
    round_repeats: int
    server_widths: tuple[int, ...]
    server_repeats: int


PROFILES = {
    "quick": Profile("quick", widths=(16,), keeps=(0.2,), step_repeats=12, tff_repeats=3, tff_batches=(1, 4),
                     memory_widths=(16,), memory_repeats=1, memory_steps=3, round_clients=3, round_examples=96,
                     round_epochs=1, round_repeats=2, server_widths=(16,), server_repeats=3),
    "full": Profile("full", widths=(16, 64), keeps=(0.1, 0.2, 0.4), step_repeats=20, tff_repeats=3,
                    tff_batches=(2, 8), memory_widths=(16, 64), memory_repeats=1, memory_steps=4, round_clients=5,
                    round_examples=400, round_epochs=2, round_repeats=3, server_widths=(16, 64), server_repeats=5),
}
SECTIONS = ("keras_step", "tff_step", "memory", "rounds", "server", "precision", "precision_ops")
PRECISIONS = ("float32", "mixed_bfloat16")


# --- models -------------------------------------------------------------------------------------------------
def full_model(width: int):
    import tensorflow as tf

    import prism_tf

    tf.keras.utils.set_random_seed(0)
    return prism_tf.models.build_model("resnet18", width=width, num_classes=10, input_shape=INPUT)


_VARIANTS: dict[int, Variants] = {}


def variants_of(width: int) -> Variants:
    """One `Variants` per width for the whole bench process (the width baseline's search builds many models)."""
    if width not in _VARIANTS:
        _VARIANTS[width] = Variants(width)
    return _VARIANTS[width]


class Variants:
    """The compared client models of one width, by name (`names`); architectures with fresh weights (a step's
    time and memory do not depend on the values)."""

    def __init__(self, width: int) -> None:
        import prism_tf

        self.width = width
        self.full = full_model(width)
        self.factorized = prism_tf.factorize(self.full)
        self.plan = prism_tf.SubmodelPlan.of(self.factorized)
        self.full_plan = prism_tf.SubmodelPlan.of(self.full)
        self._sizes: dict[str, tuple] = {}
        self._ratios: dict[str, dict] = {}

    @staticmethod
    def names(keeps: tuple[float, ...]) -> list[str]:
        names = ["full", *(f"prism_k{k}" for k in keeps), "prism_k0.2_align8", "prism_k0.2_ok0.2", "width_k0.2"]
        return list(dict.fromkeys(names))

    def sizes(self, name: str) -> tuple[object, dict]:
        """``(the model sizes are taken from, the group sizes)`` of variant ``name``."""
        if name not in self._sizes:
            self._sizes[name] = self._find_sizes(name)
        return self._sizes[name]

    def _find_sizes(self, name: str) -> tuple[object, dict]:
        from prism_tf import budget

        if name == "full":
            return self.full, {}
        if name.startswith("prism_k"):
            keep, *options = name[len("prism_k"):].split("_")
            output_keep = next((float(o[2:]) for o in options if o.startswith("ok")), None)
            multiple = next((int(o[5:]) for o in options if o.startswith("align")), 1)
            return self.factorized, budget.spectral_sizes(self.plan, float(keep), output_keep, multiple_of=multiple)
        if name.startswith("width_k"):
            target = budget.submodel_cost(self.factorized, self.plan,
                                          budget.spectral_sizes(self.plan, float(name[len("width_k"):])))
            fraction, _ = budget.match_width_fraction(self.full, self.full_plan, target["flops"])
            return self.full, budget.width_sizes(self.full_plan, fraction)
        raise ValueError(f"unknown variant {name!r}")

    def model(self, name: str):
        import prism_tf

        source, sizes = self.sizes(name)
        if not sizes:
            return source
        plan = prism_tf.SubmodelPlan.of(source)
        return prism_tf.submodel.submodel_architecture(source, plan, plan.sizes_with(sizes))

    def cost_ratios(self, name: str) -> dict[str, float]:
        import prism_tf

        if name not in self._ratios:
            self._ratios[name] = prism_tf.budget.cost_ratios(prism_tf.cost(self.model(name)), prism_tf.cost(self.full))
        return self._ratios[name]


@contextlib.contextmanager
def legacy_combine() -> Iterator[None]:
    """Principal layers in their form before this bench (ω applied to the rank-wide response map, not folded into
    the ``[rank, out]`` combination): traced inside this context, for the before/after ratio."""
    import tensorflow as tf

    from prism_tf import layers

    def combine(self, responses):
        responses = responses * tf.cast(self.kernel_scale, responses.dtype)
        outputs = tf.tensordot(responses, tf.cast(self.combination, responses.dtype), axes=1)
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, outputs.dtype))
        return self.activation(outputs)

    current = layers._PrincipalMixin._combine
    layers._PrincipalMixin._combine = combine
    try:
        yield
    finally:
        layers._PrincipalMixin._combine = current


@contextlib.contextmanager
def legacy_dataset_loop() -> Iterator[None]:
    """The client computation in its form before this bench, traced inside this context: the training loop runs
    over the dataset itself (AutoGraph's ReduceDataset), not over an iterator (`client_work.train_submodel`)."""
    import builtins

    import tensorflow as tf

    from tff_pipelines.round import client_work

    # Shadows the builtin for the module's code: datasets stay datasets, everything else is iterated as before.
    client_work.iter = lambda x: x if isinstance(x, tf.data.Dataset) else builtins.iter(x)
    try:
        yield
    finally:
        del client_work.iter


def sgd_step(model):
    """A ``tf.function`` SGD-with-momentum step of ``model`` on one fixed random batch (momentum slots built)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, *INPUT)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, BATCH).astype(np.int32))
    optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, tf.cast(model(x, training=True), tf.float32))  # float32 logits at any precision
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step


def train_step(model) -> Callable[[], object]:
    """`sgd_step` of ``model``, traced and run twice before returning."""
    step = sgd_step(model)
    step()
    step()
    return lambda: step().numpy()


# --- timing -------------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU seconds of this process and its live children: the TFF worker runs the computations in a child."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
    return total


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, seed: int = 0) -> dict[str, dict]:
    """Run every call once per repeat, in a shuffled order; per name the wall and CPU seconds of each repeat."""
    order = random.Random(seed)
    names = list(calls)
    out = {n: {"wall": [], "cpu": []} for n in names}
    for _ in range(repeats):
        order.shuffle(names)
        for n in names:
            wall, cpu = time.perf_counter(), cpu_seconds()
            calls[n]()
            out[n]["wall"].append(time.perf_counter() - wall)
            out[n]["cpu"].append(cpu_seconds() - cpu)
    return out


def medians(times: dict) -> dict[str, float]:
    return {k: float(np.median(v)) for k, v in times.items()}


def load_average() -> float:
    return float(os.getloadavg()[0])


# --- sections -----------------------------------------------------------------------------------------------
def keras_step(width: int, profile: Profile) -> dict:
    """Plain-Keras training steps of every variant and of the pre-bench layer form, interleaved."""
    variants = variants_of(width)
    names = Variants.names(profile.keeps)
    calls = {n: train_step(variants.model(n)) for n in names}
    with legacy_combine():
        calls["prism_k0.2_legacy_form"] = train_step(variants.model("prism_k0.2"))
    load = load_average()
    times = interleaved(calls, profile.step_repeats)
    rows = {}
    for n, t in times.items():
        base = n.replace("_legacy_form", "")
        rows[n] = {"ms": 1000 * float(np.median(t["wall"])), "cpu_ms": 1000 * float(np.median(t["cpu"])),
                   **{f"{m}_ratio": v for m, v in variants.cost_ratios(base).items()}}
    full = rows["full"]
    for r in rows.values():
        r["time_ratio"] = r["ms"] / full["ms"]
        r["cpu_ratio"] = r["cpu_ms"] / full["cpu_ms"]
    return {"width": width, "repeats": profile.step_repeats, "batch": BATCH, "load_before": load, "rows": rows}


def _client_computation(variants: Variants, name: str, precision: str = "float32"):
    """The TFF client computation (broadcast) of a variant and a function making its argument for a dataset."""
    import prism_tf
    from tff_pipelines.round import client_work
    from tff_pipelines.round.layout import ClientAssignment, ClientStart, Received, RoundLayout
    from tff_pipelines.round.process import batch_spec

    source, sizes = variants.sizes(name)
    layout = RoundLayout.build(source, sizes)
    # The same steps as `sgd_step` (SGD with momentum; the gradient clip as the process has it): no decay terms.
    training = client_work.ClientTraining(frobenius_decay=0.0, weight_decay=0.0, precision=precision)
    work = client_work.build_client_training(layout, batch_spec(INPUT, BATCH), training)
    server = [w.numpy() for w in prism_tf.submodel.flat_weights(source)]
    received = Received([], [server[p] for p in layout.travelling()])
    assignment = ClientAssignment([], [])
    if name != "full":  # a PriSM client: its index vectors and ω from one sampled selection
        keep = float(name[len("prism_k"):].split("_")[0])
        assignment = layout.assignment(prism_tf.sample(source, keep_ratio=keep, seed=(0, 0, 0)))

    def argument(dataset):  # the computation's two arguments
        return ClientStart(received, assignment), dataset

    return work, argument


def synthetic_dataset(examples: int, seed: int):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=rng.normal(size=(examples, *INPUT)).astype(np.float32),
        y=rng.integers(0, 10, examples).astype(np.int32))).batch(BATCH, drop_remainder=True)


def tff_step(width: int, profile: Profile) -> dict:
    """Client training steps as TFF runs them: slope and intercept over two dataset lengths, interleaved."""
    variants = variants_of(width)
    names = ["full", *(f"prism_k{k}" for k in profile.keeps)]
    short, long = profile.tff_batches
    data = {n: synthetic_dataset(n * BATCH, n) for n in (short, long)}
    calls = {}
    for name in [*names, "prism_k0.2_dataset_loop"]:
        with legacy_dataset_loop() if name.endswith("_dataset_loop") else contextlib.nullcontext():
            work, argument = _client_computation(variants, name.replace("_dataset_loop", ""))
        work(*argument(data[short]))  # the first call starts the worker and loads the computation
        for n in (short, long):
            arg = argument(data[n])
            calls[f"{name}@{n}"] = (lambda w=work, a=arg: w(*a))
    load = load_average()
    times = interleaved(calls, profile.tff_repeats)
    rows = {}
    for name in [*names, "prism_k0.2_dataset_loop"]:
        t_short, t_long = (float(np.median(times[f"{name}@{n}"]["wall"])) for n in (short, long))
        step = (t_long - t_short) / (long - short)
        rows[name] = {"step_ms": 1000 * step, "per_client_overhead_ms": 1000 * (t_short - short * step),
                      "call_ms": {str(n): 1000 * float(np.median(times[f"{name}@{n}"]["wall"])) for n in (short, long)},
                      "flops_ratio": variants.cost_ratios(name.replace("_dataset_loop", ""))["flops"]}
    for r in rows.values():
        r["time_ratio"] = r["step_ms"] / rows["full"]["step_ms"]
    return {"width": width, "repeats": profile.tff_repeats, "batches": [short, long], "load_before": load,
            "rows": rows}


def memory_child(width: int, factorized: bool, sizes: dict[str, int], steps: int, precision: str = "float32") -> dict:
    """In a fresh process, after one warm-up step: peak RSS of ``steps`` training steps over the RSS held before
    them, and the peak of TensorFlow's CPU allocator over what it held before them."""
    import tensorflow as tf

    import prism_tf

    model = full_model(width)
    if factorized:
        model = prism_tf.factorize(model)
    if sizes:
        plan = prism_tf.SubmodelPlan.of(model)
        model = prism_tf.submodel.submodel_architecture(model, plan, plan.sizes_with(sizes))
    model = prism_tf.precision.with_precision(model, precision)
    step = sgd_step(model)
    # The first step also maps TensorFlow's kernels and sets up oneDNN and the thread pools (about 2 GB of RSS
    # for any model here): it runs before the measurement, and the kernel's peak-RSS mark is reset after it
    # (`/proc/self/clear_refs` "5"), so the peak below is what training steps themselves hold at once.
    step().numpy()
    try:  # TensorFlow's own CPU allocator counts (TF 2.14 reports them for CPU:0)
        tf.config.experimental.reset_memory_stats("CPU:0")
        allocated_before = int(tf.config.experimental.get_memory_info("CPU:0")["current"])
    except (ValueError, RuntimeError):
        allocated_before = 0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes()
    peak_before = _peak_rss_bytes()
    sampled = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            sampled.append(_rss_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    for _ in range(steps):
        step().numpy()
    stop.set()
    watcher.join()
    peak = _peak_rss_bytes()
    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
        allocator = {"peak_bytes": int(info["peak"]) - allocated_before, "before_bytes": allocated_before}
    except (ValueError, RuntimeError) as error:
        allocator = {"unavailable": str(error).splitlines()[0][:160]}
    return {"width": width, "steps": steps, "rss_before": before, "max_rss_before": peak_before,
            "max_rss": peak, "max_rss_delta": peak - before, "sampled_peak_delta": max(sampled) - before,
            "allocator": allocator}


def _peak_rss_bytes() -> int:
    """The kernel's peak-RSS mark (``VmHWM``), which writing "5" to ``/proc/self/clear_refs`` resets."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(width: int, name: str, profile: Profile, repeat: int, precision: str = "float32") -> dict:
    variants = variants_of(width)
    source, sizes = variants.sizes(name)
    spec = {"width": width, "factorized": source is variants.factorized, "sizes": sizes, "steps": profile.memory_steps,
            "precision": precision}
    command = [sys.executable, str(Path(__file__).resolve()), "--child-memory", json.dumps(spec)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory child {width}/{name} failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record.update(variant=name, repeat=repeat, precision=precision,
                  **{f"{m}_ratio": v for m, v in variants.cost_ratios(name).items()})
    return record


def _process(method: str, distribution: str, profile: Profile, width: int, precision: str = "float32"):
    import tensorflow_federated as tff

    import prism_tf
    from prism_tf.federated.methods import Method
    from tff_pipelines.round import client_work, distributor, process

    # The bench recipe's client training (bench/accuracy.py RECIPE, constant rate; augmentation is data-side and
    # left out).
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=0.1, momentum=0.9)
    return process.build_prism_process(
        lambda: prism_tf.models.build_model("resnet18", width=width, num_classes=10, input_shape=INPUT), optimizer,
        method=Method(method, keep_ratio=0.2), batch_size=BATCH, model_distributor=distributor.named(distribution),
        client_training=client_work.ClientTraining(frobenius_decay=2e-4, weight_decay=5e-4, precision=precision),
        lr_schedule=None)


def _keras_local(proc, state, datasets, ids) -> Callable[[], None]:
    """The round's clients trained one after another in plain Keras: one traced step per sub-model shape,
    each client's sub-model weights assigned before its batches (the floor TFF's round is compared with)."""
    import tensorflow as tf

    import prism_tf

    server = proc.server_model
    proc.assign_to(state)
    if proc.method.spectral or proc.method.width:
        selections = proc.selections(state, ids)
        plan = proc.plan
        sub = prism_tf.submodel.submodel_architecture(server, plan, plan.sizes(selections[0].indices()))
        starts = [prism_tf.submodel.submodel_weights(server, s, plan) for s in selections]
    else:
        sub = tf.keras.models.clone_model(server)
        starts = [[w.numpy() for w in prism_tf.submodel.flat_weights(server)]] * len(datasets)
    optimizer = tf.keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(sub.trainable_variables)
    momenta = [v for v in optimizer.variables if "momentum" in v.name]
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, sub(x, training=True))
        grads = tape.gradient(loss, sub.trainable_variables)
        optimizer.apply_gradients(zip(grads, sub.trainable_variables, strict=True))
        return loss

    def run() -> None:
        for start, dataset in zip(starts, datasets, strict=True):
            prism_tf.submodel.set_flat_weights(sub, start)
            for v in momenta:  # a fresh momentum per client, as in the TFF client
                v.assign(tf.zeros_like(v))
            for batch in dataset:
                loss = step(batch["x"], batch["y"])
            loss.numpy()

    run()  # traces the step
    return run


def rounds(profile: Profile, width: int = 16) -> dict:
    """PriSM (select, broadcast) and FedAvg rounds against the same clients' plain-Keras training, interleaved."""
    datasets = [synthetic_dataset(profile.round_examples, 100 + c).repeat(profile.round_epochs)
                for c in range(profile.round_clients)]
    ids = list(range(profile.round_clients))
    processes = {"prism_select": _process("prism", "select", profile, width),
                 "prism_broadcast": _process("prism", "broadcast", profile, width),
                 "fedavg": _process("fedavg", "broadcast", profile, width)}
    states = {}
    calls = {}
    for name, proc in processes.items():
        state = proc.initialize()
        state, _ = proc.next(state, datasets, ids)  # warm-up: the worker loads the computation
        states[name] = state

        def call(name=name, proc=proc):
            # Every repeat trains the same round from the same state: identical work each time.
            proc.next(states[name], datasets, ids)
        calls[name] = call
    calls["keras_prism"] = _keras_local(processes["prism_broadcast"], states["prism_broadcast"], datasets, ids)
    calls["keras_fedavg"] = _keras_local(processes["fedavg"], states["fedavg"], datasets, ids)
    load = load_average()
    times = interleaved(calls, profile.round_repeats)
    wall = {n: float(np.median(t["wall"])) for n, t in times.items()}
    cpu = {n: float(np.median(t["cpu"])) for n, t in times.items()}
    steps = profile.round_epochs * (profile.round_examples // BATCH)
    return {"width": width, "clients": profile.round_clients, "examples": profile.round_examples,
            "epochs": profile.round_epochs, "steps_per_client": steps, "repeats": profile.round_repeats,
            "load_before": load, "seconds": wall, "cpu_seconds": cpu,
            "rounds_per_hour": {n: 3600.0 / wall[n] for n in ("prism_select", "prism_broadcast", "fedavg")},
            "tff_overhead": {"select": wall["prism_select"] / wall["keras_prism"],
                             "broadcast": wall["prism_broadcast"] / wall["keras_prism"],
                             "fedavg": wall["fedavg"] / wall["keras_fedavg"]},
            "prism_vs_fedavg": {"select": wall["prism_select"] / wall["fedavg"],
                                "broadcast": wall["prism_broadcast"] / wall["fedavg"],
                                "keras": wall["keras_prism"] / wall["keras_fedavg"]}}


def precision_steps(width: int, profile: Profile) -> dict:
    """Plain-Keras steps and TFF client-computation steps of the full model and PriSM keep 0.2, float32 against
    mixed bfloat16, interleaved: per model, the bf16/f32 time ratio (below 1: bf16 is faster)."""
    import prism_tf

    variants = variants_of(width)
    short, long = profile.tff_batches
    data = {n: synthetic_dataset(n * BATCH, n) for n in (short, long)}
    calls = {}
    for name in ("full", "prism_k0.2"):
        for mode in PRECISIONS:
            calls[f"keras/{name}/{mode}"] = train_step(prism_tf.precision.with_precision(variants.model(name), mode))
            work, argument = _client_computation(variants, name, mode)
            work(*argument(data[short]))  # loads the computation into the worker
            for n in (short, long):
                arg = argument(data[n])
                calls[f"tff/{name}/{mode}@{n}"] = (lambda w=work, a=arg: w(*a))
    load = load_average()
    times = interleaved(calls, profile.tff_repeats * 4)
    wall = {k: float(np.median(t["wall"])) for k, t in times.items()}
    cpu = {k: float(np.median(t["cpu"])) for k, t in times.items()}
    rows = {}
    for name in ("full", "prism_k0.2"):
        for mode in PRECISIONS:
            tff_step_s = (wall[f"tff/{name}/{mode}@{long}"] - wall[f"tff/{name}/{mode}@{short}"]) / (long - short)
            tff_cpu_s = (cpu[f"tff/{name}/{mode}@{long}"] - cpu[f"tff/{name}/{mode}@{short}"]) / (long - short)
            rows[f"{name}/{mode}"] = {"keras_ms": 1000 * wall[f"keras/{name}/{mode}"],
                                      "keras_cpu_ms": 1000 * cpu[f"keras/{name}/{mode}"],
                                      "tff_step_ms": 1000 * tff_step_s, "tff_step_cpu_ms": 1000 * tff_cpu_s}
    for name in ("full", "prism_k0.2"):
        f32, bf16 = rows[f"{name}/float32"], rows[f"{name}/mixed_bfloat16"]
        bf16["ratio"] = {k: bf16[k] / f32[k] for k in f32}
    return {"width": width, "repeats": profile.tff_repeats * 4, "batches": [short, long], "load_before": load,
            "rows": rows}


def precision_rounds(profile: Profile, width: int = 16) -> dict:
    """Whole TFF rounds (PriSM select, FedAvg) at the bench settings, float32 against mixed bfloat16, interleaved."""
    datasets = [synthetic_dataset(profile.round_examples, 100 + c).repeat(profile.round_epochs)
                for c in range(profile.round_clients)]
    ids = list(range(profile.round_clients))
    calls, states = {}, {}
    for method, distribution in (("prism", "select"), ("fedavg", "broadcast")):
        for mode in PRECISIONS:
            name = f"{method}/{mode}"
            proc = _process(method, distribution, profile, width, mode)
            state, _ = proc.next(proc.initialize(), datasets, ids)  # warm-up: the worker loads the computation
            states[name] = state
            calls[name] = (lambda p=proc, n=name: p.next(states[n], datasets, ids))
    load = load_average()
    times = interleaved(calls, profile.round_repeats)
    wall = {n: float(np.median(t["wall"])) for n, t in times.items()}
    cpu = {n: float(np.median(t["cpu"])) for n, t in times.items()}
    return {"width": width, "clients": profile.round_clients, "examples": profile.round_examples,
            "epochs": profile.round_epochs, "repeats": profile.round_repeats, "load_before": load,
            "seconds": wall, "cpu_seconds": cpu,
            "rounds_per_hour_ratio": {m: wall[f"{m}/float32"] / wall[f"{m}/mixed_bfloat16"]
                                      for m in ("prism", "fedavg")}}


def _graph_step(model_json: str, precision: str):
    """One graph-mode training step (forward, ``tf.gradients``, SGD) of a model at ``precision``: a session and
    the function running it with full tracing, returning TensorFlow's ``StepStats``."""
    import tensorflow as tf

    import prism_tf

    graph = tf.Graph()
    with graph.as_default():
        model = tf.keras.models.model_from_json(prism_tf.precision.with_policy(model_json, precision),
                                                custom_objects=prism_tf.CUSTOM_OBJECTS)
        x = tf.compat.v1.placeholder(tf.float32, [BATCH, *INPUT])
        y = tf.compat.v1.placeholder(tf.int32, [BATCH])
        logits = prism_tf.precision.float32_logits(model(x, training=True))
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        variables = model.trainable_variables
        step = tf.group(*[v.assign_sub(0.01 * g) for v, g in zip(variables, tf.gradients(loss, variables),
                                                                   strict=True)])
        init = tf.compat.v1.global_variables_initializer()
    session = tf.compat.v1.Session(graph=graph)
    session.run(init)
    rng = np.random.default_rng(0)
    feed = {x: rng.normal(size=(BATCH, *INPUT)).astype(np.float32), y: rng.integers(0, 10, BATCH)}
    for _ in range(3):  # oneDNN picks and caches its kernels on the first calls
        session.run(step, feed)
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)

    def traced():
        metadata = tf.compat.v1.RunMetadata()
        session.run(step, feed, options=options, run_metadata=metadata)
        return metadata.step_stats

    return session, traced


def _op_type(node) -> str:
    label = node.timeline_label  # "name = OpType(inputs)"
    return label.split(" = ", 1)[1].split("(", 1)[0] if " = " in label else node.node_name


def precision_ops(width: int, profile: Profile) -> dict:
    """Per op type, the summed op time of one traced graph-mode step, float32 against bf16 (medians over
    alternating traced steps), for the full model and PriSM keep 0.2; and the weight-gradient nodes where bf16
    loses most. Summed op time adds ops that ran in parallel: it shows where the time goes, not the step's wall."""
    variants = variants_of(width)
    load = load_average()
    out = {"width": width, "load_before": load, "repeats": profile.step_repeats, "models": {}}
    for name in ("full", "prism_k0.2"):
        model_json = variants.model(name).to_json()
        traced = {m: _graph_step(model_json, m) for m in PRECISIONS}
        by_type = {m: collections.defaultdict(list) for m in PRECISIONS}
        by_filter = {m: collections.defaultdict(list) for m in PRECISIONS}
        for _ in range(profile.step_repeats):
            for mode in PRECISIONS:
                types, filters = collections.Counter(), collections.Counter()
                for device in traced[mode][1]().dev_stats:
                    for node in device.node_stats:
                        kind = _op_type(node)
                        types[kind] += node.op_end_rel_micros
                        if "BackpropFilter" in kind:
                            filters[node.node_name] += node.op_end_rel_micros
                for kind, micros in types.items():
                    by_type[mode][kind].append(micros)
                for node, micros in filters.items():
                    by_filter[mode][node].append(micros)
        for session, _ in traced.values():
            session.close()
        med = {m: {k: float(np.median(v)) / 1000 for k, v in by_type[m].items()} for m in PRECISIONS}
        filt = {m: {k: float(np.median(v)) / 1000 for k, v in by_filter[m].items()} for m in PRECISIONS}
        f32, bf16 = (sum(med[m].values()) for m in PRECISIONS)
        worst = sorted(filt["mixed_bfloat16"], key=lambda k: filt["float32"].get(k, 0) - filt["mixed_bfloat16"][k])
        out["models"][name] = {
            "summed_ms": {"float32": f32, "mixed_bfloat16": bf16}, "ratio": bf16 / f32,
            "op_ms": med,
            "filter_gradients_worst": [{"node": k, "float32_ms": filt["float32"].get(k, 0.0),
                                        "mixed_bfloat16_ms": filt["mixed_bfloat16"][k]} for k in worst[:6]],
            "filter_gradients_ms": {m: sum(filt[m].values()) for m in PRECISIONS},
        }
    return out


def _conv_training_work(dtype, loops: int):
    """``fn(x, k)``: ``loops`` times a 3x3 convolution's forward pass and both gradients in ``dtype``."""
    import tensorflow as tf

    def body(x, k):
        inputs = tf.cast(x, dtype)  # activations arrive in the compute dtype; the kernel is cast every step

        def one(i, total):
            kernel = tf.cast(k, dtype)
            with tf.GradientTape() as tape:
                tape.watch([inputs, kernel])
                loss = tf.reduce_sum(tf.cast(tf.nn.conv2d(inputs, kernel, 1, "SAME"), tf.float32)) * 1e-6
            d_inputs, d_kernel = tape.gradient(loss, [inputs, kernel])
            return i + 1, total + tf.reduce_sum(tf.cast(d_kernel, tf.float32)) + tf.reduce_sum(
                tf.cast(d_inputs[0, 0, 0], tf.float32))

        return tf.while_loop(lambda i, _: i < loops, one, (tf.constant(0), tf.constant(0.0)))[1]

    return body


def onednn_child(log_path: str) -> None:
    """In a process started with ``ONEDNN_VERBOSE=1``: one bf16 3x3 convolution's training work in this process
    (oneDNN logs it to stdout, which the parent reads up to the ``--- worker ---`` line), then in TFF's worker (its
    output to ``log_path``)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from tff_pipelines.workers import runtime

    runtime.install_local_context(log_path=log_path)
    x_spec, k_spec = tf.TensorSpec([BATCH, 32, 32, 64], tf.float32), tf.TensorSpec([3, 3, 64, 64], tf.float32)
    body = _conv_training_work(tf.bfloat16, 1)
    x, k = np.ones(x_spec.shape, np.float32), np.ones(k_spec.shape, np.float32)
    tf.function(body)(x, k).numpy()
    print("--- worker ---", flush=True)
    tff.tensorflow.computation(body, x_spec, k_spec)(x, k)
    runtime.shutdown()


def onednn_kernels() -> dict:
    """The oneDNN version, ISA and convolution implementations that a bf16 convolution step uses in this process
    and in TFF's worker (``ONEDNN_VERBOSE=1`` in a child process; the worker inherits the variable)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "worker.log"
        env = dict(os.environ, ONEDNN_VERBOSE="1")
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-onednn", str(log)], cwd=ROOT,
                              capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise SystemExit(f"oneDNN child failed:\n{done.stderr[-3000:]}")
        process_log = done.stdout.split("--- worker ---")[0]
        worker_log = log.read_text() if log.exists() else ""

    def parse(text: str) -> dict:
        info, convs = [], set()
        for line in text.splitlines():
            fields = line.split(",")
            if line.startswith("onednn_verbose,info,") and ("oneDNN v" in line or ",isa:" in line):
                info.append(",".join(fields[2:]))
            elif line.startswith("onednn_verbose,exec,cpu,convolution,"):
                convs.add(f"{fields[4]} {fields[5]}")  # implementation, propagation kind
        return {"info": info, "convolutions": sorted(convs)}

    return {"process": parse(process_log), "worker": parse(worker_log)}


def precision_worker_ops(profile: Profile) -> dict:
    """One 3x3 convolution's training work (forward, input and filter gradients, in a while loop) as a TFF
    computation run by TFF's worker and as a ``tf.function`` in this process, float32 against bf16, at the layer
    shapes of PriSM's keep-0.2 sub-models (narrow rank-r outputs) and of the full models. Per loop: the slope
    between two loop counts, so TFF's per-call cost is not counted."""
    import tensorflow as tf
    import tensorflow_federated as tff

    shapes = ((32, 16, 4), (32, 16, 16), (32, 64, 13), (32, 64, 64), (4, 512, 103), (4, 512, 512))
    short, long = 4, 20
    rng = np.random.default_rng(0)
    calls = {}
    for hw, cin, cout in shapes:
        x_spec = tf.TensorSpec([BATCH, hw, hw, cin], tf.float32)
        k_spec = tf.TensorSpec([3, 3, cin, cout], tf.float32)
        x = rng.normal(size=x_spec.shape).astype(np.float32)
        k = rng.normal(size=k_spec.shape).astype(np.float32)
        for mode, dtype in zip(PRECISIONS, (tf.float32, tf.bfloat16), strict=True):
            for loops in (short, long):
                body = _conv_training_work(dtype, loops)
                in_process = tf.function(body)
                in_worker = tff.tensorflow.computation(body, x_spec, k_spec)
                in_process(x, k)
                in_worker(x, k)  # loads the computation into the worker
                key = f"{hw}x{hw}/{cin}->{cout}"
                calls[f"{key}/process/{mode}@{loops}"] = lambda f=in_process, a=(x, k): f(*a).numpy()
                calls[f"{key}/worker/{mode}@{loops}"] = lambda f=in_worker, a=(x, k): f(*a)
    load = load_average()
    wall = medians({n: t["wall"] for n, t in interleaved(calls, profile.tff_repeats * 3).items()})
    rows = {}
    for hw, cin, cout in shapes:
        key = f"{hw}x{hw}/{cin}->{cout}"
        per_loop = {f"{where}/{mode}": (wall[f"{key}/{where}/{mode}@{long}"] - wall[f"{key}/{where}/{mode}@{short}"])
                    / (long - short) for where in ("process", "worker") for mode in PRECISIONS}
        rows[key] = {where: {"float32_ms": 1000 * per_loop[f"{where}/float32"],
                             "mixed_bfloat16_ms": 1000 * per_loop[f"{where}/mixed_bfloat16"],
                             "ratio": per_loop[f"{where}/mixed_bfloat16"] / per_loop[f"{where}/float32"]}
                     for where in ("process", "worker")}
    return {"load_before": load, "repeats": profile.tff_repeats * 3, "loops": [short, long], "rows": rows,
            "onednn": onednn_kernels()}


def server(width: int, profile: Profile) -> dict:
    """The server step of a round of 5 keep-0.2 clients (`prism_tf.server.finish_round`) as a tf.function, beside
    its parts: the averaging alone and the re-factorizing SVDs alone, in float64 (what it runs) and float32, one
    layer at a time (what it runs) and batched by matrix shape (`prism_tf.spectral.refactorize_many`)."""
    import tensorflow as tf

    import prism_tf
    from prism_tf import server as server_lib
    from prism_tf import spectral

    model = prism_tf.factorize(full_model(width))
    plan = prism_tf.SubmodelPlan.of(model)
    acc = server_lib.Accumulator(plan)
    for c in range(5):
        selection = prism_tf.sample(model, keep_ratio=0.2, seed=(0, 0, c))
        acc.add(prism_tf.submodel.submodel_weights(model, selection, plan), selection, 400.0)
    weights = [tf.constant(w.numpy()) for w in prism_tf.submodel.flat_weights(model)]
    sums = [tf.constant(s, tf.float32) for s in acc.sums]
    counts = [tf.constant(c, tf.float32) for c in acc.counts]
    positions = list(server_lib.principal_positions(plan).values())
    averaged, _ = server_lib.finish_round(plan, weights, sums, counts, 0, refactorize_every=0)
    factors = [(averaged[p["principal_kernels"]], averaged[p["combination"]]) for p in positions]

    finish = tf.function(lambda: server_lib.finish_round(plan, weights, sums, counts, 0)[0])
    average = tf.function(lambda: server_lib.finish_round(plan, weights, sums, counts, 0, refactorize_every=0)[0])
    svds = {d: tf.function(lambda d=d: [spectral.refactorize(a, b, svd_dtype=d) for a, b in factors])
            for d in (tf.float64, tf.float32)}
    batched = {d: tf.function(lambda d=d: spectral.refactorize_many(factors, svd_dtype=d))
               for d in (tf.float64, tf.float32)}
    calls = {"finish_round": finish, "average_only": average, "svd_float64": svds[tf.float64],
             "svd_float32": svds[tf.float32], "svd_float64_batched": batched[tf.float64],
             "svd_float32_batched": batched[tf.float32]}
    outputs = {n: f() for n, f in calls.items()}  # traces
    timed = {n: (lambda f=f: tf.nest.map_structure(lambda t: t.numpy(), f())) for n, f in calls.items()}
    times = interleaved(timed, profile.server_repeats)
    # float32 against float64: the kernels A·B they represent and the singular values sampling reads.
    kernel_err, sv_err = 0.0, 0.0
    for (a64, b64, s64), (a32, b32, s32) in zip(outputs["svd_float64"], outputs["svd_float32"], strict=True):
        w64, w32 = spectral.rebuild_kernel(a64, b64).numpy(), spectral.rebuild_kernel(a32, b32).numpy()
        kernel_err = max(kernel_err, float(np.max(np.abs(w64 - w32)) / np.max(np.abs(w64))))
        sv_err = max(sv_err, float(np.max(np.abs(s64.numpy() - s32.numpy())) / float(s64[0])))
    return {"width": width, "repeats": profile.server_repeats, "principal_layers": len(positions),
            "ms": {n: 1000 * float(np.median(t["wall"])) for n, t in times.items()},
            "cpu_ms": {n: 1000 * float(np.median(t["cpu"])) for n, t in times.items()},
            "float32_max_kernel_rel_error": kernel_err, "float32_max_singular_value_rel_error": sv_err}


# --- results ------------------------------------------------------------------------------------------------
def write(out: Path, results: dict, profile: Profile) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "README.md").write_text(report(results, profile))


def report(results: dict, profile: Profile) -> str:
    command = "`.venv/bin/python bench/speed.py" + (" --profile quick`" if profile.name == "quick" else "`")
    lines = [f"# Speed and memory against their floors ({profile.name} profile)", "",
             f"Command: {command} (`make bench-speed` runs the full profile). ResNet-18 (CIFAR variant), batch "
             f"{BATCH}, 2 shared CPU cores. Every ratio compares configurations measured in the same run, "
             "interleaved, medians over repeats; `cpu` columns are the CPU time of the bench process and its "
             "children, the TFF worker included (not inflated by waiting for a core). `load` is the 1-minute "
             "load average when the section started.", ""]
    lines += targets(results)
    notes = OUT / "bounds.md"
    if profile.name == "full" and notes.exists():  # hand-written: what bounds each missed target
        lines += [notes.read_text().strip(), ""]
    for key in sorted(k for k in results if k.startswith("keras_step/")):
        r = results[key]
        lines += [f"## Client training step, plain Keras, width {r['width']} ({r['repeats']} interleaved steps "
                  f"each, load {r['load_before']:.1f})", "",
                  "| model | ms | vs full | cpu vs full | flops floor | activations |", "|---|---|---|---|---|---|"]
        for name, row in r["rows"].items():
            lines.append(f"| {name} | {row['ms']:.1f} | {row['time_ratio']:.3f} | {row['cpu_ratio']:.3f} | "
                         f"{row['flops_ratio']:.3f} | {row['activation_bytes_ratio']:.3f} |")
        fit = step_profile(r["rows"])
        if fit:
            lines += ["", f"Profile (least squares over the variants' cpu ratios, `step ≈ a·flops + b·activations`): "
                      f"a = {fit['a']:.2f}, b = {fit['b']:.2f}: {fit['a']:.0%} of the full model's step scales with "
                      f"its multiply-adds, {fit['b']:.0%} with the activations it reads and writes. For PriSM keep "
                      f"0.2 this predicts {fit['prism_k0.2']:.3f} "
                      f"(measured {r['rows']['prism_k0.2']['cpu_ratio']:.3f})."]
        lines.append("")
    for key in sorted(k for k in results if k.startswith("tff_step/")):
        r = results[key]
        lines += [f"## Client training step in the TFF client computation, width {r['width']} (datasets of "
                  f"{r['batches'][0]} and {r['batches'][1]} batches, {r['repeats']} repeats, load "
                  f"{r['load_before']:.1f})", "",
                  f"| model | ms per step | vs full | flops floor | TFF's fixed cost per client (ms) | call with "
                  f"{r['batches'][0]} / {r['batches'][1]} batches (ms) |", "|---|---|---|---|---|---|"]
        for name, row in r["rows"].items():
            calls = " / ".join(f"{v:.0f}" for v in row["call_ms"].values())
            lines.append(f"| {name} | {row['step_ms']:.1f} | {row['time_ratio']:.3f} | {row['flops_ratio']:.3f} | "
                         f"{row['per_client_overhead_ms']:.0f} | {calls} |")
        lines.append("")
    mem = [r for k, r in results.items() if k.startswith("memory/")]
    for width in sorted({r["width"] for r in mem}):
        rows = collections.defaultdict(list)
        for r in mem:
            if r["width"] == width:
                rows[r["variant"]].append(r)
        if "full" not in rows:
            continue
        full = float(np.median([r["max_rss_delta"] for r in rows["full"]]))
        allocator = rows["full"][0]["allocator"]
        lines += [f"## Peak memory of one client's training, width {width} (peak RSS of a fresh process over its "
                  f"RSS before the measured steps, after one warm-up step; {rows['full'][0]['steps']} steps)", "",
                  "| model | max RSS delta (MB) | vs full | TF allocator peak over before (MB) | vs full | "
                  "activations floor "
                  "(`prism_tf.cost`) |", "|---|---|---|---|---|---|"]
        full_alloc = float(np.median([r["allocator"].get("peak_bytes", np.nan) for r in rows["full"]]))
        for name, rs in rows.items():
            delta = float(np.median([r["max_rss_delta"] for r in rs]))
            alloc = float(np.median([r["allocator"].get("peak_bytes", np.nan) for r in rs]))
            lines.append(f"| {name} | {delta / 2**20:.1f} | {delta / full:.3f} | {alloc / 2**20:.1f} | "
                         f"{alloc / full_alloc:.3f} | {rs[0]['activation_bytes_ratio']:.3f} |")
        if "unavailable" in allocator:
            lines += ["", "TensorFlow's allocator figures: unavailable (`get_memory_info`: "
                      f"{allocator['unavailable']})"]
        lines.append("")
    if "rounds/w16" in results:
        r = results["rounds/w16"]
        lines += [f"## Rounds at width {r['width']}: {r['clients']} clients x {r['examples']} examples x "
                  f"{r['epochs']} epochs ({r['steps_per_client']} steps each), {r['repeats']} repeats, load "
                  f"{r['load_before']:.1f}", "",
                  "| round | s | cpu s | rounds/hour |", "|---|---|---|---|"]
        for name, s in r["seconds"].items():
            rph = r["rounds_per_hour"].get(name)
            lines.append(f"| {name} | {s:.2f} | {r['cpu_seconds'][name]:.2f} | {f'{rph:.0f}' if rph else '-'} |")
        o, p = r["tff_overhead"], r["prism_vs_fedavg"]
        lines += ["", f"TFF overhead (round / the same clients in plain Keras): select {o['select']:.2f}, broadcast "
                  f"{o['broadcast']:.2f}, FedAvg {o['fedavg']:.2f}. PriSM round / FedAvg round: select "
                  f"{p['select']:.2f}, broadcast {p['broadcast']:.2f}, plain Keras {p['keras']:.2f}.", ""]
    lines += precision_report(results)
    for key in sorted(k for k in results if k.startswith("server/")):
        r = results[key]
        ms = r["ms"]
        share = ""
        if r["width"] == 16 and "rounds/w16" in results:
            round_s = results["rounds/w16"]["seconds"]["prism_select"]
            share = (f" The server step is {ms['finish_round'] / 1000 / round_s:.1%} of a PriSM select round "
                     f"({round_s:.2f} s).")
        lines += [f"## Server step, width {r['width']} ({r['repeats']} repeats)", "",
                  "| server step | ms | cpu ms |", "|---|---|---|"]
        lines += [f"| {n} | {v:.1f} | {r['cpu_ms'][n]:.1f} |" for n, v in ms.items()]
        lines += ["", f"float32 SVD against float64: largest kernel difference {r['float32_max_kernel_rel_error']:.1e}"
                  f" of the kernel's largest entry, largest singular-value difference "
                  f"{r['float32_max_singular_value_rel_error']:.1e} of the largest singular value.{share}", ""]
    return "\n".join(lines)


def precision_report(results: dict) -> list[str]:
    """The ``precision`` section's tables: bf16 against float32, ratios measured in one run."""
    lines = []
    r = results.get("precision/rounds/w16")
    if r:
        lines += [f"## Mixed bfloat16 against float32: whole TFF rounds, width {r['width']} ({r['clients']} clients "
                  f"x {r['examples']} examples x {r['epochs']} epochs, {r['repeats']} interleaved repeats, load "
                  f"{r['load_before']:.1f})", "",
                  "| round | float32 s | bf16 s | rounds per hour, bf16 / float32 | cpu s f32 / bf16 |",
                  "|---|---|---|---|---|"]
        for m in ("prism", "fedavg"):
            lines.append(f"| {m} | {r['seconds'][f'{m}/float32']:.2f} | {r['seconds'][f'{m}/mixed_bfloat16']:.2f} | "
                         f"{r['rounds_per_hour_ratio'][m]:.2f}x | {r['cpu_seconds'][f'{m}/float32']:.2f} / "
                         f"{r['cpu_seconds'][f'{m}/mixed_bfloat16']:.2f} |")
        lines.append("")
    for key in sorted(k for k in results if k.startswith("precision/steps/")):
        r = results[key]
        lines += [f"## Mixed bfloat16 against float32: one training step, width {r['width']} ({r['repeats']} "
                  f"interleaved repeats, load {r['load_before']:.1f})", "",
                  "| model | plain Keras f32 / bf16 ms | bf16 / f32 | TFF client step f32 / bf16 ms | bf16 / f32 |",
                  "|---|---|---|---|---|"]
        for name in ("full", "prism_k0.2"):
            f, b = r["rows"][f"{name}/float32"], r["rows"][f"{name}/mixed_bfloat16"]
            lines.append(f"| {name} | {f['keras_ms']:.1f} / {b['keras_ms']:.1f} | {b['ratio']['keras_ms']:.2f} | "
                         f"{f['tff_step_ms']:.1f} / {b['tff_step_ms']:.1f} | {b['ratio']['tff_step_ms']:.2f} |")
        lines.append("")
    mem = {k: v for k, v in results.items() if k.startswith("precision/memory/")}
    if mem:
        lines += ["## Mixed bfloat16 against float32: one client's peak memory (max RSS over the warmed process)",
                  "", "| width | model | float32 MB | bf16 MB | bf16 / f32 |", "|---|---|---|---|---|"]
        for width in sorted({v["width"] for v in mem.values()}):
            for name in ("full", "prism_k0.2"):
                pair = [mem.get(f"precision/memory/w{width}/{name}/{m}") for m in PRECISIONS]
                if all(pair):
                    f, b = (p["max_rss_delta"] / 2**20 for p in pair)
                    lines.append(f"| {width} | {name} | {f:.1f} | {b:.1f} | {b / f:.2f} |")
        lines.append("")
    lines += precision_ops_report(results)
    return lines


def precision_ops_report(results: dict) -> list[str]:
    """The ``precision_ops`` section's tables: where a bf16 step's time goes, and the worker's kernels."""
    lines = []
    for key in sorted(k for k in results if k.startswith("precision_ops/steps/")):
        r = results[key]
        lines += [f"## Mixed bfloat16 against float32: where a step's time goes, width {r['width']} (summed op time "
                  f"of one graph-mode step from TensorFlow's step statistics, medians of {r['repeats']} traced "
                  f"steps each, load {r['load_before']:.1f})", ""]
        models = r["models"]
        types = {}
        for m in models.values():
            for kind in {*m["op_ms"]["float32"], *m["op_ms"]["mixed_bfloat16"]}:
                types[kind] = max(types.get(kind, 0.0), m["op_ms"]["float32"].get(kind, 0.0),
                                  m["op_ms"]["mixed_bfloat16"].get(kind, 0.0))
        kinds = [k for k in sorted(types, key=types.get, reverse=True) if types[k] >= 0.5][:12]
        lines += ["| op type | " + " | ".join(f"{n} f32 / bf16 ms | bf16 / f32" for n in models) + " |",
                  "|---|" + "---|---|" * len(models)]
        for kind in [*kinds, "all ops"]:
            cells = []
            for m in models.values():
                if kind == "all ops":
                    a, b = m["summed_ms"]["float32"], m["summed_ms"]["mixed_bfloat16"]
                else:
                    a, b = m["op_ms"]["float32"].get(kind, 0.0), m["op_ms"]["mixed_bfloat16"].get(kind, 0.0)
                cells.append(f"{a:.1f} / {b:.1f} | {b / a:.2f}" if a > 0 else f"- / {b:.1f} | -")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        for name, m in models.items():
            worst = ", ".join(f"{w['node'].split('/')[2] if w['node'].count('/') >= 2 else w['node']} "
                              f"{w['float32_ms']:.2f} → {w['mixed_bfloat16_ms']:.2f} ms"
                              for w in m["filter_gradients_worst"][:4])
            lines.append(f"\n{name}: weight gradients where bf16 loses most (f32 → bf16): {worst}.")
        lines.append("")
    r = results.get("precision_ops/worker")
    if r:
        lines += [f"## One 3x3 convolution's training work in TFF's worker and in this process, bf16 / float32 "
                  f"(per forward + both gradients: the slope between calls of {r['loops'][0]} and {r['loops'][1]}, "
                  f"{r['repeats']} interleaved calls each, load "
                  f"{r['load_before']:.1f})", "",
                  "| input, Cin -> Cout | process f32 / bf16 ms | bf16 / f32 | worker f32 / bf16 ms | bf16 / f32 |",
                  "|---|---|---|---|---|"]
        for key, row in r["rows"].items():
            p, w = row["process"], row["worker"]
            lines.append(f"| {key} | {p['float32_ms']:.2f} / {p['mixed_bfloat16_ms']:.2f} | {p['ratio']:.2f} | "
                         f"{w['float32_ms']:.2f} / {w['mixed_bfloat16_ms']:.2f} | {w['ratio']:.2f} |")
        for where, kernels in r.get("onednn", {}).items():
            lines.append(f"\noneDNN in the {where} (`ONEDNN_VERBOSE=1`, one bf16 convolution step): "
                         f"{'; '.join(kernels['info']) or 'no oneDNN output'}; convolutions: "
                         f"{', '.join(kernels['convolutions']) or 'none'}.")
        lines.append("")
    return lines


def step_profile(rows: dict) -> dict | None:
    """Split a step's time into a part proportional to flops and one proportional to activation bytes: the
    least-squares ``(a, b)`` of ``cpu_ratio ≈ a·flops_ratio + b·activation_ratio`` over the measured variants."""
    names = [n for n in rows if "legacy" not in n]
    if len(names) < 3:
        return None
    design = np.array([[rows[n]["flops_ratio"], rows[n]["activation_bytes_ratio"]] for n in names])
    target = np.array([rows[n]["cpu_ratio"] for n in names])
    (a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
    out = {"a": float(a), "b": float(b)}
    if "prism_k0.2" in rows:
        prism = rows["prism_k0.2"]
        out["prism_k0.2"] = float(a * prism["flops_ratio"] + b * prism["activation_bytes_ratio"])
    return out


def targets(results: dict) -> list[str]:
    """The speed issue's targets against what this run measured (rows only for what was measured)."""
    rows = []

    def add(what: str, value: float | None, target: float, fmt: str = "{:.3f}") -> None:
        if value is not None and np.isfinite(value):
            rows.append(f"| {what} | {fmt.format(value)} | {fmt.format(target)} | "
                        f"{'met' if value <= target else 'missed'} |")

    for width, target in ((64, 0.30), (16, 0.6)):
        keras = results.get(f"keras_step/w{width}", {}).get("rows", {}).get("prism_k0.2")
        add(f"client step, keep 0.2, width {width}, plain Keras (wall)", keras and keras["time_ratio"], target)
        add(f"client step, keep 0.2, width {width}, plain Keras (cpu)", keras and keras["cpu_ratio"], target)
        tff_row = results.get(f"tff_step/w{width}", {}).get("rows", {}).get("prism_k0.2")
        add(f"client step, keep 0.2, width {width}, TFF client computation", tff_row and tff_row["time_ratio"], target)
    r = results.get("rounds/w16")
    if r:
        add("PriSM round / FedAvg round, width 16 (select)", r["prism_vs_fedavg"]["select"], 0.5)
        add("PriSM round / FedAvg round, width 16 (broadcast)", r["prism_vs_fedavg"]["broadcast"], 0.5)
        add("TFF overhead, broadcast", r["tff_overhead"]["broadcast"], 1.2)
        add("TFF overhead, select", r["tff_overhead"]["select"], 1.5)
        server16 = results.get("server/w16")
        if server16:
            add("server step / PriSM select round, width 16", server16["ms"]["finish_round"] / 1000
                / r["seconds"]["prism_select"], 0.05, "{:.1%}")
    server64, step64 = results.get("server/w64"), results.get("tff_step/w64", {}).get("rows", {}).get("prism_k0.2")
    if server64 and r and step64:
        clients, steps = r["clients"], r["steps_per_client"]
        estimate = clients * (steps * step64["step_ms"] + step64["per_client_overhead_ms"]) / 1000
        add(f"server step / PriSM round, width 64 (round estimated: {clients} clients x ({steps} TFF steps + TFF's "
            "fixed cost per client))", server64["ms"]["finish_round"] / 1000 / (estimate + server64["ms"][
                "finish_round"] / 1000), 0.05, "{:.1%}")
    for width in (16, 64):
        mem = [x for k, x in results.items() if k.startswith(f"memory/w{width}/")]
        by, alloc = collections.defaultdict(list), collections.defaultdict(list)
        for x in mem:
            by[x["variant"]].append(x["max_rss_delta"])
            alloc[x["variant"]].append(x["allocator"].get("peak_bytes", np.nan))
        if "full" in by and "prism_k0.2_ok0.2" in by:
            # Judged by TensorFlow's allocator peak, the tensors a step holds at once. The RSS peak above a warmed
            # process is shown without a verdict: pages the warm-up step freed are reused without showing up.
            add(f"peak client memory, PriSM keep 0.2 output_keep 0.2, width {width} (TF allocator)",
                float(np.median(alloc["prism_k0.2_ok0.2"]) / np.median(alloc["full"])), 0.6)
            rss = float(np.median(by["prism_k0.2_ok0.2"]) / np.median(by["full"]))
            rows.append(f"| peak client memory, same, max RSS above the warmed process (a lower bound, no verdict) "
                        f"| {rss:.3f} | - | |")
    if not rows:
        return []
    return ["## Against the targets", "", "| figure | measured | target | |", "|---|---|---|---|", *rows, ""]


def units(profile: Profile, only: set[str]) -> list[tuple[str, Callable[[], dict]]]:
    """The resumable units of a profile, in the order they run (the figures the targets need first)."""
    wide_first = sorted(profile.widths, reverse=True)
    out = []
    if "rounds" in only:
        out.append(("rounds/w16", lambda: rounds(profile)))
    for width in wide_first:
        if "keras_step" in only:
            out.append((f"keras_step/w{width}", lambda w=width: keras_step(w, profile)))
        if "server" in only and width in profile.server_widths:
            out.append((f"server/w{width}", lambda w=width: server(w, profile)))
    if "memory" in only:
        for width in sorted(profile.memory_widths, reverse=True):
            for name in ("full", "prism_k0.2", "prism_k0.2_ok0.2", "width_k0.2"):
                for rep in range(profile.memory_repeats):
                    out.append((f"memory/w{width}/{name}/{rep}",
                                lambda w=width, n=name, r=rep: memory(w, n, profile, r)))
    if "tff_step" in only:
        for width in wide_first:
            out.append((f"tff_step/w{width}", lambda w=width: tff_step(w, profile)))
    if "precision" in only:
        out.append(("precision/rounds/w16", lambda: precision_rounds(profile)))
        for width in sorted(profile.widths):
            out.append((f"precision/steps/w{width}", lambda w=width: precision_steps(w, profile)))
        for width in sorted(profile.memory_widths):
            for name in ("full", "prism_k0.2"):
                for mode in PRECISIONS:
                    out.append((f"precision/memory/w{width}/{name}/{mode}",
                                lambda w=width, n=name, m=mode: memory(w, n, profile, 0, m)))
    if "precision_ops" in only:
        for width in sorted(profile.widths):
            out.append((f"precision_ops/steps/w{width}", lambda w=width: precision_ops(w, profile)))
        out.append(("precision_ops/worker", lambda: precision_worker_ops(profile)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--redo", action="store_true", help="measure again the units already in results.json")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    parser.add_argument("--child-onednn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_onednn:
        onednn_child(args.child_onednn)
        return 0
    if args.child_memory:
        spec = json.loads(args.child_memory)
        print(json.dumps(memory_child(spec["width"], spec["factorized"], spec["sizes"], spec["steps"],
                                      spec.get("precision", "float32"))), flush=True)
        return 0
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    profile = PROFILES[args.profile]
    out = OUT if profile.name == "full" else OUT / profile.name
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() and not args.redo else {}
    # Importing the runtime installs our TFF worker context: every computation here, the sections' own ones too,
    # runs in a worker that is stopped at exit (`import tff_pipelines` alone imports nothing).
    from tff_pipelines.workers import runtime  # noqa: F401

    for key, run in units(profile, only):
        if key in results:
            print(f"{key}: kept", flush=True)
            continue
        began = time.perf_counter()
        results[key] = run()
        results[key]["seconds_to_measure"] = time.perf_counter() - began
        write(out, results, profile)
        print(f"{key}: {time.perf_counter() - began:.0f} s", flush=True)
    write(out, results, profile)
    print(report(results, profile))
    return 0


if __name__ == "__main__":
    import prism_tf.quiet

    prism_tf.quiet.import_tensorflow()  # TensorFlow without its CPU-only start-up noise
    sys.exit(main())
