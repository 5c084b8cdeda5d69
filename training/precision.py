"""Choose a mixed-precision policy that actually runs on this machine.

TensorFlow's bf16 Conv3D backward pass (``Conv3DBackpropFilterV2`` through oneDNN) kills the
process with SIGSEGV / SIGABRT on CPUs with AVX-512 BF16 (seen on AMD EPYC, TF 2.21); no Python
exception is raised, so it cannot be caught in-process.  Before a fit under a mixed policy we run
**one training step of the same architecture in a subprocess** (batch 2, the real input shape,
a tiny width) and look at how it ended:

* ``fit.precision = "auto"``: a policy whose probe fails falls back to ``float32`` with a logged
  reason (the run is slower, never dead).
* a forced policy whose probe fails raises :class:`PrecisionUnsupportedError` naming the key,
  the signal and what to set instead.

Results are cached per process (policy, family, input shape), so cross-validation probes once.
``MEDCLF_PRECISION_PROBE=0`` skips the probe (trust the policy), for machines where it is known
to work and the ~5 s matter.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from medclf_node.preprocess import PreprocessSpec
from training.modeling.config import ModelConfig

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 300.0
PROBE_ENV = "MEDCLF_PRECISION_PROBE"
_PROBE_WIDTH = 4  # base_filters of the probed copy: same layers and ops, a fraction of the cost


class PrecisionUnsupportedError(RuntimeError):
    """A forced precision policy cannot train this model on this machine."""


@dataclass(frozen=True)
class ProbeResult:
    """How the one-step probe of ``policy`` ended."""

    policy: str
    ok: bool
    reason: str  # "" when ok; else e.g. "killed by SIGSEGV" and the last lines of stderr


# TF/absl log lines and faulthandler's traceback: not the reason a step died
_NOISE = re.compile(
    r"^([IWE]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages|File |Thread |Current thread|Extension modules)"
)
_cache: dict[tuple[str, str, tuple[int, ...]], ProbeResult] = {}


def default_policy(gpu: bool) -> str:
    """What 'auto' asks for: fp16 on GPU, bf16 on CPU (fp16 is ~20x slower on CPU)."""
    return "mixed_float16" if gpu else "mixed_bfloat16"


def _describe_exit(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            what = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            what = f"killed by signal {-returncode}"
    else:
        what = f"exited with status {returncode}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    tail = [line for line in lines if not _NOISE.match(line)][-2:]
    return what + (": " + " | ".join(tail)[:400] if tail else "")


def _probe_command(payload: str) -> list[str]:
    return [sys.executable, "-m", "training.precision", payload]


def probe(policy: str, model: ModelConfig, spec: PreprocessSpec, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run one training step of ``model`` under ``policy`` in a subprocess; never raises for a crash."""
    key = (policy, model.family, tuple(int(v) for v in spec.input_shape))
    if key in _cache:
        return _cache[key]
    payload = json.dumps({
        "policy": policy,
        "model": model.model_copy(
            update={"base_filters": min(model.base_filters, _PROBE_WIDTH), "weights": None}
        ).model_dump(mode="json"),
        "spec": spec.model_dump(mode="json"),
    })
    try:
        proc = subprocess.run(
            _probe_command(payload),
            capture_output=True, text=True, timeout=timeout,
        )
        result = ProbeResult(policy, proc.returncode == 0,
                             "" if proc.returncode == 0 else _describe_exit(proc.returncode, proc.stderr))
    except subprocess.TimeoutExpired:
        result = ProbeResult(policy, False, f"one training step did not finish within {timeout:.0f} s")
    _cache[key] = result
    log.info("precision probe %s %s %s: %s", policy, model.family, key[2], "ok" if result.ok else result.reason)
    return result


def choose_policy(requested: str, model: ModelConfig, spec: PreprocessSpec, *, gpu: bool) -> str:
    """The policy to train ``model`` with: ``requested``, or float32 when 'auto' cannot run here."""
    wanted = default_policy(gpu) if requested == "auto" else requested
    if wanted == "float32" or os.environ.get(PROBE_ENV, "1") == "0":
        return wanted
    result = probe(wanted, model, spec)
    if result.ok:
        return wanted
    if requested == "auto":
        log.warning("fit.precision 'auto' would use %s, but one training step of %s under it failed on this "
                    "machine (%s); training in float32 instead", wanted, model.family, result.reason)
        return "float32"
    raise PrecisionUnsupportedError(
        f"fit.precision = {requested!r} cannot train {model.family} on this machine: one training step "
        f"{result.reason}. Set fit.precision = 'float32' (or 'auto', which falls back by itself)."
    )


def _probe_main(payload: str) -> int:
    """Child: build the model under the policy and take one optimizer step on random data."""
    import numpy as np

    from training.modeling.factory import build_model
    from training.tfenv import keras, tf

    args: dict[str, Any] = json.loads(payload)
    model_cfg = ModelConfig.model_validate(args["model"])
    spec = PreprocessSpec.model_validate(args["spec"])
    keras.mixed_precision.set_global_policy(args["policy"])
    model = build_model(model_cfg, spec)
    x = np.random.default_rng(0).random((2, *model.input_shape[1:]), dtype=np.float32)
    y = np.array([[0.0], [1.0]], np.float32)
    opt = keras.optimizers.Adam(1e-3)
    with tf.GradientTape() as tape:
        loss = keras.losses.binary_crossentropy(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    opt.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    if not np.all(np.isfinite(loss.numpy())):
        print("loss is not finite", file=sys.stderr)  # noqa: T201 - the child reports on stderr
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1]))
