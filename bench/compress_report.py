"""README.md and the accuracy-against-size plot of bench/compress.py, from its results.json (no measuring here)."""

from __future__ import annotations

from pathlib import Path

LABELS = {"prism": "PriSM", "fedavg": "FedAvg"}
LOSS_BUDGET_PP = 1.0


def _setting(rule: str, value: float | None) -> str:
    return "full" if rule == "full" else f"{'rank share' if rule == 'rank_keep' else 'energy'} {value:g}"


def _float_rows(rows: dict, label: str) -> list[dict]:
    found = [r for k, r in rows.items() if k.startswith(f"{label}/") and k.endswith("/float")]
    order = {"full": 0, "rank_keep": 1, "energy": 2}
    return sorted(found, key=lambda r: (order[r["rule"]], -(r["value"] or 0)))


def _int8_rows(rows: dict, label: str) -> list[tuple[str, dict]]:
    return [(k.rsplit("/", 1)[1], r) for k, r in rows.items() if k.startswith(f"{label}/")
            and not k.endswith("/float")]


def _recommended(rows: list[dict]) -> dict | None:
    full = next((r for r in rows if r["rule"] == "full"), None)
    if full is None:
        return None
    fine = [r for r in rows if r["accuracy"] >= full["accuracy"] - LOSS_BUDGET_PP / 100 - 1e-12]
    best = min(fine, key=lambda r: (r["bytes"], -r["accuracy"]))
    return full if best["bytes"] >= full["bytes"] else best


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(10.5, 5.4))
    colours = {"prism": "tab:blue", "fedavg": "tab:orange"}
    for label in results.get("runs", {}):
        floats = _float_rows(rows, label)
        if not floats:
            continue
        colour, name = colours.get(label, "gray"), LABELS.get(label, label)
        full = next(r for r in floats if r["rule"] == "full")
        for rule, marker, style in (("rank_keep", "o", "-"), ("energy", "s", "--")):
            series = sorted((r for r in floats if r["rule"] == rule), key=lambda r: r["bytes"])
            ax.plot([r["bytes"] / 1e6 for r in series], [100 * r["accuracy"] for r in series], style, marker=marker,
                    color=colour, label=f"{name}, {'rank share' if rule == 'rank_keep' else 'energy'} (float)")
            for r in series:
                ax.annotate(f"{r['value']:g}", (r["bytes"] / 1e6, 100 * r["accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3), color=colour)
        ax.plot([full["bytes"] / 1e6], [100 * full["accuracy"]], "*", color=colour, markersize=13,
                label=f"{name}, full (float)")
        ax.axhline(100 * full["accuracy"] - LOSS_BUDGET_PP, color=colour, linewidth=0.7, linestyle=":")
        for variant, marker in (("ptq_int8", "^"), ("qat_int8", "v")):
            points = [r for v, r in _int8_rows(rows, label) if v == variant]
            if points:
                ax.plot([r["bytes"] / 1e6 for r in points], [100 * r["exported_accuracy"] for r in points], marker,
                        color=colour, markersize=8, markerfacecolor="none",
                        label=f"{name}, {'post-training' if variant == 'ptq_int8' else 'QAT'} int8")
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(".tflite file size (MB, log scale)")
    ax.set_ylabel("CIFAR-10 test accuracy in LiteRT (%, all 10,000 images)")
    ax.set_title("Accuracy against file size (dotted: 1 pp below each full model)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    """Write ``out/README.md`` and ``out/accuracy_vs_size.png`` from ``results`` (bench/compress.py's json)."""
    out = Path(out)
    rows = results.get("rows", {})
    lines = ["# Compression for deployment: rank truncation and int8 (issue 27)", "",
             "`bench/compress.py` (docs/export.md, \"Picking a rank\"). Every accuracy is top-1 on the **whole "
             "10,000-image CIFAR-10 test set**, measured on the written `.tflite` file in LiteRT's interpreter "
             "(`ai-edge-litert` 2.3.0), as a phone runs it. Each truncated model has its BatchNorm statistics "
             "recalibrated on the run's calibration images (`--eval-norm recalibrate`, as the run evaluated).", "",
             "Runs (read only):", ""]
    for label, run in results.get("runs", {}).items():
        lines.append(f"- {LABELS.get(label, label)}: `{run['path']}` ({run['method']}, {run['model']} width "
                     f"{run['width']}, {run['dataset']}, server model after round {run['round']} of {run['rounds']})")
    lines += ["", "Commands (each row's own `python -m export model` command is in results.json):", ""]
    lines += [f"    {c}" for c in results.get("commands", [])]
    lines += ["", "Latency: median of the invokes of one LiteRT interpreter (1 thread) at batch 1 and 32, **given as "
              "a ratio to the full model of the same run**: the bench ran at `nice -n 10` beside another long "
              "benchmark on a 2-core machine, so absolute times are under load and only ratios measured in one run "
              "compare. MACs: multiply-adds per image (`prism_tf.cost`).", ""]
    summary = []
    for label in results.get("runs", {}):
        floats = _float_rows(rows, label)
        if not floats:
            continue
        name = LABELS.get(label, label)
        full = next(r for r in floats if r["rule"] == "full")
        lines += [f"## {name}: rank truncation (float32)", "",
                  "| setting | file MB | × full | params | M MACs | × full | LiteRT acc % | Δ pp | Keras acc % | "
                  "LiteRT−Keras pp | latency b1 × | latency b32 × | layers factorized/plain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in floats:
            lines.append(
                f"| {_setting(r['rule'], r['value'])} | {r['bytes'] / 1e6:.3f} | {r['bytes'] / full['bytes']:.2f} | "
                f"{r['params']:,} | {r['flops'] / 1e6:.1f} | {r['flops'] / full['flops']:.2f} | "
                f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - full['accuracy']):+.2f} | "
                f"{100 * r['keras_accuracy']:.2f} | {100 * (r['accuracy'] - r['keras_accuracy']):+.2f} | "
                f"{r['latency']['1'] / full['latency']['1']:.2f} | {r['latency']['32'] / full['latency']['32']:.2f} | "
                f"{r['layers_factorized']}/{r['layers_plain']} |")
        same = next((r for r in floats if r["rule"] == "rank_keep" and r["value"] == 1.0), None)
        if same is not None:
            lines += ["", f"Latency noise: rank share 1 is the full model again (every layer plain, the same graph), "
                      f"yet measured {same['latency']['1'] / full['latency']['1']:.2f}× at batch 1 and "
                      f"{same['latency']['32'] / full['latency']['32']:.2f}× at batch 32: under this load a latency "
                      "ratio within that spread of 1 says nothing; multiply-adds are the reliable cost column."]
        checks = full["checks"]
        worst = max(abs(r["checks"]["litert_vs_keras_pp"]) for r in floats)
        failed = [r for r in floats if not r["checks"]["litert_vs_keras_ok"]]
        lines += ["", f"Checks: the largest LiteRT−Keras difference over these rows is {worst:.2f} pp "
                  f"({'all within 0.2 pp' if not failed else f'{len(failed)} rows beyond 0.2 pp'})."]
        if "run_recorded_accuracy" in checks:
            lines[-1] += (f" The full model's {100 * full['accuracy']:.2f}% against the run's own evaluation after "
                          f"round {checks['run_recorded_round']} (TFF, metrics.jsonl): "
                          f"{100 * checks['run_recorded_accuracy']:.2f}% ({checks['litert_vs_run_pp']:.2f} pp apart).")
        best = _recommended(floats)
        half = best["bytes"] <= 0.5 * full["bytes"]
        lines += ["", f"**Recommended** (the smallest file within {LOSS_BUDGET_PP:g} pp of the full model): "
                  f"**{_setting(best['rule'], best['value'])}**, {best['bytes'] / 1e6:.3f} MB = "
                  f"{best['bytes'] / full['bytes']:.2f}× the full model's {full['bytes'] / 1e6:.3f} MB, "
                  f"{100 * best['accuracy']:.2f}% ({100 * (best['accuracy'] - full['accuracy']):+.2f} pp). Target "
                  f"\"at most half the bytes at no more than 1 pp loss\" by truncation alone: "
                  f"**{'met' if half else 'not met'}**.", ""]
        summary.append((name, full, best, half))
        int8 = _int8_rows(rows, label)
        if int8:
            lines += [f"## {name}: int8 (post-training and quantization-aware)", "",
                      "| setting | variant | file MB | × full float | LiteRT acc % | Δ pp vs full float | float "
                      "TFLite acc % of the same model | fake-quantized Keras acc % | tf.lite re-score % | "
                      "latency b1 × | latency b32 × |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for variant, r in sorted(int8, key=lambda item: (item[1]["rank_keep"] is not None
                                                             or item[1]["energy"] is not None, item[0])):
                rule = "rank_keep" if r["rank_keep"] is not None else "energy" if r["energy"] is not None else "full"
                value = r["rank_keep"] if r["rank_keep"] is not None else r["energy"]
                qat = variant == "qat_int8"
                fake = f"{100 * r['qat_keras_accuracy']:.2f}" if qat else "—"
                b1, b32 = r["latency"]["1"] / full["latency"]["1"], r["latency"]["32"] / full["latency"]["32"]
                lines.append(
                    f"| {_setting(rule, value)} | {'QAT ' + str(r['qat_steps']) + ' steps' if qat else 'post-training'}"
                    f" | {r['bytes'] / 1e6:.3f} | {r['bytes'] / full['bytes']:.2f} | {100 * r['exported_accuracy']:.2f}"
                    f" | {100 * (r['exported_accuracy'] - full['accuracy']):+.2f} | "
                    f"{100 * r['float_tflite_accuracy']:.2f} | "
                    f"{fake} | {100 * r['checks']['tf_interpreter_accuracy']:.2f} | {b1:.2f} | {b32:.2f} |")
            apart = max(100 * abs(r["checks"]["tf_interpreter_accuracy"] - r["exported_accuracy"]) for _, r in int8)
            lines += ["", "Checks: every int8 file scored again from disk in TensorFlow's `tf.lite.Interpreter` "
                      f"agrees with LiteRT within {apart:.2f} pp ({round(apart * 100)} of 10,000 images at most; "
                      "the two runtimes' int8 kernels may round a requantization differently); the float "
                      "TFLite column is the same model converted without quantization (its LiteRT−Keras difference "
                      f"at most {max(r['checks']['float_litert_vs_keras_pp'] for _, r in int8):.2f} pp).", ""]
            fits = [(v, r) for v, r in int8 if r["exported_accuracy"] >= full["accuracy"] - LOSS_BUDGET_PP / 100
                    - 1e-12]
            if fits:
                v, r = min(fits, key=lambda item: item[1]["bytes"])
                lines += [f"Smallest int8 file within {LOSS_BUDGET_PP:g} pp: {r['bytes'] / 1e6:.3f} MB "
                          f"({r['bytes'] / full['bytes']:.2f}× the full float file), "
                          f"{'QAT' if v == 'qat_int8' else 'post-training'}, {100 * r['exported_accuracy']:.2f}%.",
                          ""]
            by_setting: dict = {}
            for v, r in int8:
                by_setting.setdefault((r["rank_keep"], r["energy"]), {})[v] = r
            for (keep, energy), pair in by_setting.items():
                if {"ptq_int8", "qat_int8"} <= set(pair):
                    gain = 100 * (pair["qat_int8"]["exported_accuracy"] - pair["ptq_int8"]["exported_accuracy"])
                    where = _setting("rank_keep" if keep is not None else "energy" if energy is not None else "full",
                                     keep if keep is not None else energy)
                    verdict = ("QAT helps" if gain > 0.1 else "QAT does not help" if gain < -0.1
                               else "no difference beyond 0.1 pp")
                    lines.append(f"- QAT against post-training int8 at {where}: {gain:+.2f} pp ({verdict}).")
            lines.append("")
    if summary:
        lines += ["## Summary", ""]
        labels = [label for label in results.get("runs", {}) if _float_rows(rows, label)]
        if len(labels) == 2:  # the same architecture: the same setting gives the same file size in both runs
            a, b = labels
            pairs = [(r, next((q for q in _float_rows(rows, b) if (q["rule"], q["value"]) == (r["rule"], r["value"])),
                              None)) for r in _float_rows(rows, a) if r["rule"] != "energy"]
            diffs = ", ".join(f"{_setting(r['rule'], r['value'])} ({r['bytes'] / 1e6:.2f} MB) "
                              f"{100 * (r['accuracy'] - q['accuracy']):+.2f}" for r, q in pairs if q is not None)
            lines += [f"- {LABELS.get(a, a)} − {LABELS.get(b, b)} at the same file size, pp: {diffs}.", ""]
        files = []
        for label in labels:
            files += [(r["bytes"], r["accuracy"], f"{LABELS.get(label, label)} {_setting(r['rule'], r['value'])} "
                       "float") for r in _float_rows(rows, label)]
            for variant, r in _int8_rows(rows, label):
                rule = "rank_keep" if r["rank_keep"] is not None else "energy" if r["energy"] is not None else "full"
                value = r["rank_keep"] if r["rank_keep"] is not None else r["energy"]
                files.append((r["bytes"], r["exported_accuracy"], f"{LABELS.get(label, label)} "
                              f"{_setting(rule, value)} {'QAT' if variant == 'qat_int8' else 'post-training'} int8"))
        front, best = [], -1.0
        for size, accuracy, name in sorted(files):
            if accuracy > best:
                front.append(f"{name}: {size / 1e6:.3f} MB, {100 * accuracy:.2f}%")
                best = accuracy
        lines += ["Best accuracy per byte over every file measured (each file more accurate than every smaller one):",
                  "", *[f"1. {entry}" for entry in front], ""]
        for name, full, best, half in summary:
            lines.append(f"- {name}: full {full['bytes'] / 1e6:.3f} MB at {100 * full['accuracy']:.2f}%; recommended "
                         f"{_setting(best['rule'], best['value'])} at {best['bytes'] / full['bytes']:.2f}× the bytes, "
                         f"{100 * (best['accuracy'] - full['accuracy']):+.2f} pp; half the bytes within 1 pp by "
                         f"truncation: {'yes' if half else 'no'}.")
        lines += ["", "Reading these numbers:", "",
                  "- The 1 pp budget is relative to each run's own full model: a run that truncates well (ordered "
                  "spectra) is not for that a better deployment than a more accurate run at the same size; the "
                  "line \"at the same file size\" and the best-per-byte list compare the runs directly.",
                  "- Sampling noise: one accuracy on 10,000 images has a standard error of about 0.5 pp at 35-50%; "
                  "two models scored on the same images differ with less noise (their errors are correlated), but "
                  "differences of 0.1-0.3 pp (a QAT-against-post-training gap, say) are within what retraining or "
                  "another calibration draw would move.",
                  "- int8 quarters the file at any rank; truncation and int8 multiply.", "",
                  "![accuracy against file size](accuracy_vs_size.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines))
    _plot(results, out / "accuracy_vs_size.png")
