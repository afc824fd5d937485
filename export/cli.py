"""``python -m export {model,client,ingest,finish-round,serve,enrol}``: models out of a run for devices, updates in.

docs/export.md (its command table and "The way back"), docs/serve.md (``serve``, ``enrol``). Needs no TFF: every
command reads the run directory with TensorFlow and numpy only.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="the trained global model (Keras, SavedModel or TFLite)")
    model.add_argument("--run", required=True, help="run directory")
    model.add_argument("--round", type=int, help="server weights after this round (default: the latest)")
    model.add_argument("--format", default="keras", choices=("keras", "savedmodel", "tflite"))
    model.add_argument("--out", required=True, help="file (.keras, .tflite) or directory (savedmodel)")
    model.add_argument("--factorized", action="store_true", help="keep the principal-kernel layers")
    model.add_argument("--int8", action="store_true", help="post-training int8 quantization (TFLite)")
    model.add_argument("--representative", type=int, default=200, help="calibration images for --int8")
    model.add_argument("--qat", type=int, metavar="STEPS",
                       help="with --int8: quantization-aware fine-tuning (tfmot) for STEPS steps before the "
                            "conversion, distilling the float model on the run's calibration images (docs/export.md)")
    model.add_argument("--qat-lr", type=float, default=1e-4, help="Adam learning rate of --qat (default 1e-4)")
    model.add_argument("--eval-examples", type=int, default=2000,
                       help="test images to measure accuracy on (0: skip, -1: all)")
    rule = model.add_mutually_exclusive_group()
    rule.add_argument("--rank-keep", type=float, metavar="F",
                      help="keep ceil(F·r) principal kernels of every layer, 0 < F <= 1 (docs/export.md, \"Picking a "
                           "rank\")")
    rule.add_argument("--energy", type=float, metavar="E",
                      help="keep the fewest kernels of each layer holding a share E of its squared singular values")
    model.add_argument("--by", default="params", choices=("params", "flops"),
                       help="what decides whether a truncated layer is written factorized or whole (default params)")

    client = commands.add_parser("client", help="one client's TFLite training sub-model for one round")
    client.add_argument("--run", required=True)
    client.add_argument("--client", type=int, required=True, help="global client id")
    client.add_argument("--round", type=int, help="1-based round (default: the run's next round)")
    client.add_argument("--out", required=True, help="CLIENT_DIR to write model.tflite, weights.npz, manifest.json")
    client.add_argument("--runtime", default="builtins", choices=("builtins", "flex"),
                        help="builtins: LiteRT alone (default); flex: TFLite's standard recipe, needs Flex ops")

    ingest = commands.add_parser("ingest", help="validate and store a device's trained weights")
    ingest.add_argument("--run", required=True)
    ingest.add_argument("--client-dir", required=True, help="the CLIENT_DIR the device was given")
    ingest.add_argument("--weights", required=True, help=".npz of the device's get_weights outputs")
    ingest.add_argument("--examples", type=float, help="examples the device trained on (its aggregation weight)")
    ingest.add_argument("--replace", action="store_true", help="overwrite this client's stored update")

    finish = commands.add_parser("finish-round", help="aggregate the stored device updates into the next checkpoint")
    finish.add_argument("--run", required=True)
    finish.add_argument("--round", type=int, help="the open round (default)")
    finish.add_argument("--min-clients", type=int, default=1)

    serve = commands.add_parser("serve", help="serve the run's rounds to enrolled devices over HTTP(S)",
                                description="docs/serve.md")
    serve.add_argument("--run", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    serve.add_argument("--min-updates", type=int,
                       help="close a round once this many updates are in (default: all its clients)")
    serve.add_argument("--round-timeout", type=float,
                       help="seconds after which a round closes with the updates it has (at least one)")
    serve.add_argument("--rounds", type=int, help="stop after closing this many rounds (default: keep serving)")
    serve.add_argument("--fill", default="devices", choices=("devices", "simulated"),
                       help="how a round closes: devices (default) finishes it with the devices' updates only; "
                            "simulated has TFF simulate the round's clients that sent no update (python -m "
                            "tff_pipelines resume --until-round N in a subprocess; needs the run's dataset)")
    serve.add_argument("--runtime", default="builtins", choices=("builtins", "flex"))
    serve.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--allow-plain-http", action="store_true",
                       help="plain HTTP on a non-loopback --host (behind a TLS-terminating reverse proxy only)")

    enrol = commands.add_parser("enrol", help="issue a device its credential for `serve` (stored only as a hash)")
    enrol.add_argument("--run", required=True)
    enrol.add_argument("--device", required=True, help="the device's name (letters, digits, . _ -)")
    enrol.add_argument("--client", type=int, help="the client id it trains for (default: the lowest free one)")
    enrol.add_argument("--replace", action="store_true", help="issue an enrolled device a new credential")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    from prism_tf.quiet import import_tensorflow

    import_tensorflow()  # first: TensorFlow without its CPU-only start-up noise (a user's TF_CPP_MIN_LOG_LEVEL wins)
    from prism_tf.federated.rundir import RunError

    try:
        if options.command == "model":
            from export.model import export_model

            n = None if options.eval_examples < 0 else options.eval_examples
            result = export_model(options.run, options.out, fmt=options.format, round_num=options.round,
                                  factorized=options.factorized, int8=options.int8,
                                  representative=options.representative, eval_examples=n,
                                  rank_keep=options.rank_keep, energy=options.energy, criterion=options.by,
                                  qat=options.qat, qat_learning_rate=options.qat_lr,
                                  log=lambda line: print(line, file=sys.stderr, flush=True))
        elif options.command == "client":
            from export.client import export_client

            result = export_client(options.run, options.client, options.out, round_num=options.round,
                                   runtime=options.runtime)
        elif options.command == "ingest":
            from export.ingest import ingest

            result = ingest(options.run, options.client_dir, options.weights, examples=options.examples,
                            replace=options.replace)
        elif options.command == "finish-round":
            from export.ingest import finish_round

            result = finish_round(options.run, options.round, min_clients=options.min_clients)
        elif options.command == "enrol":
            from export.serve.credentials import enrol

            result = enrol(options.run, options.device, options.client, replace=options.replace)
        else:
            from export.serve.app import serve
            from export.serve.rounds import RoundServer

            server = RoundServer(options.run, min_updates=options.min_updates, round_timeout=options.round_timeout,
                                 runtime=options.runtime, max_rounds=options.rounds, fill=options.fill,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
            return serve(server, host=options.host, port=options.port, tls_cert=options.tls_cert,
                         tls_key=options.tls_key, allow_plain_http=options.allow_plain_http)
    except (ValueError, RunError, OSError) as e:
        print(f"python -m export {options.command}: error: {e}", file=sys.stderr)
        return 2
    print(result.report())
    return 0
