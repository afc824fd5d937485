"""The project as a user meets it: installed (importable from anywhere) and quiet at start-up.

A CPU-only machine must not see TensorFlow's CUDA-plugin registration errors, its "could not find cuda drivers"
notices or deprecation warnings from our entry points; real warnings and errors must still show.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

NOISE = re.compile(r"cuDNN|cuFFT|cuBLAS|cuda drivers|TensorRT|oneDNN custom operations|cpu_feature_guard|"
                   r"DeprecationWarning|deprecated", re.IGNORECASE)


def _run(args: list[str], cwd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, **kwargs)


def test_the_packages_import_from_any_directory(tmp_path):
    proc = _run(["-c", "import prism_tf, tff_pipelines, export, export.tflite; print(prism_tf.__file__)"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("module", ["tff_pipelines", "export"])
def test_help_is_quiet(module, tmp_path):
    proc = _run(["-m", module, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    assert proc.stderr == "", proc.stderr[-2000:]


def test_a_tiny_run_prints_no_start_up_noise_but_real_warnings_still_show(shapes_dataset, tmp_path):
    proc = _run(["-m", "tff_pipelines", "train", "--dataset", str(shapes_dataset), "--model", "small_cnn",
                 "--width", "4", "--clients", "2", "--clients-per-round", "2", "--rounds", "1", "--batch-size", "8",
                 "--eval-examples", "12", "--calibration-examples", "16", "--out", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [line for line in proc.stderr.splitlines() if NOISE.search(line)]
    assert not noisy, noisy
    # A real warning raised after start-up reaches stderr unchanged.
    proc = _run(["-c", "import prism_tf, warnings; warnings.warn('a real warning')"], tmp_path)
    assert "a real warning" in proc.stderr


def test_importing_the_library_has_no_side_effects(tmp_path):
    """No TensorFlow import, no environment change, no descriptor redirected, no worker: entry points do those."""
    code = ("import os, sys; before = dict(os.environ); fd2 = os.fstat(2).st_ino\n"
            "import prism_tf, tff_pipelines, export, prism_tf.federated\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
            "assert dict(os.environ) == before, 'environment changed'\n"
            "assert os.fstat(2).st_ino == fd2\n"
            "assert 'factorize' in prism_tf.__all__ and 'walk_layers' not in prism_tf.__all__\n"
            "print(len(prism_tf.__all__))")
    proc = _run(["-c", code], tmp_path, env={k: v for k, v in __import__("os").environ.items()
                                             if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert int(proc.stdout) == 20
