"""The round server: devices fetch their sub-model of the open round over HTTP(S) and upload what they trained.

docs/serve.md. ``python -m export serve --run RUN`` (`export.serve.app`) serves the run's open round; ``python -m
export enrol --run RUN --device NAME`` (`export.serve.credentials`) issues a device its credential. The round logic
(`export.serve.rounds.RoundServer`) calls the exporter (`export.client`), device ingest's checks
(`export.ingest.check_update`) and the server step (`export.ingest.finish_round`), or with ``--fill simulated`` has
TFF simulate the missing clients in a subprocess (`export.serve.fill`), and every file goes through the run's
`prism_tf.federated.rundir.RunDir`. `export.serve.phone` is a device's side in Python (urllib, numpy and
LiteRT only: no TensorFlow), what the tests and ``bench/serve.py`` run.

Importing this package imports nothing heavy: the phone side must load without TensorFlow or the web framework.
"""


def one_line(text: object, limit: int = 500) -> str:
    """``text`` on one line (whitespace runs become one space), at most ``limit`` characters: every reason the
    server logs, reports or answers with."""
    return " ".join(str(text).split())[:limit]
