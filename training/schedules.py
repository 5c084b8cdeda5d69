"""Learning-rate schedule: linear warmup, then cosine decay, optionally with warm restarts (SGDR).

A ``LearningRateSchedule`` (not a callback) so the rate changes every step, survives checkpointing
and behaves the same under any distribution strategy.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from training.tfenv import keras, tf

log = logging.getLogger(__name__)


@keras.utils.register_keras_serializable(package="medclf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step): 0 -> ``peak`` linearly over ``warmup_steps``, then cosine from ``peak`` to ``peak*alpha``.

    With ``restart_steps`` > 0 the cosine part restarts (SGDR): the first cycle lasts
    ``restart_steps``, each next one ``t_mul`` times longer, with peak scaled by ``m_mul`` per cycle;
    the final value ``peak*alpha`` is reached at the end of each cycle.  Without restarts the decay
    spans ``total_steps - warmup_steps`` and stays at ``peak*alpha`` afterwards.
    """

    def __init__(
        self,
        peak: float,
        total_steps: int,
        warmup_steps: int = 0,
        alpha: float = 0.0,
        restart_steps: int = 0,
        t_mul: float = 2.0,
        m_mul: float = 1.0,
    ) -> None:
        super().__init__()
        if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
            raise ValueError("need total_steps >= 1 and 0 <= warmup_steps <= total_steps")
        if peak <= 0 or not 0 <= alpha <= 1:
            raise ValueError("need peak > 0 and 0 <= alpha <= 1")
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.alpha = float(alpha)
        self.restart_steps = int(restart_steps)
        self.t_mul = float(t_mul)
        self.m_mul = float(m_mul)

    def __call__(self, step: Any) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak, tf.float32)
        warm = tf.constant(float(max(self.warmup_steps, 1)), tf.float32)
        warmup_lr = peak * tf.minimum(step + 1.0, warm) / warm
        t = tf.maximum(step - float(self.warmup_steps), 0.0)
        if self.restart_steps > 0:
            frac, scale = self._cycle(t)
        else:
            span = float(max(self.total_steps - self.warmup_steps, 1))
            frac = tf.minimum(t / span, 1.0)
            scale = tf.constant(1.0, tf.float32)
        cos = 0.5 * (1.0 + tf.cos(math.pi * frac))
        decayed = peak * scale * ((1.0 - self.alpha) * cos + self.alpha)
        return tf.where(step < float(self.warmup_steps), warmup_lr, decayed)

    def _cycle(self, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Fraction through the current restart cycle and that cycle's peak multiplier."""
        first = float(self.restart_steps)
        if self.t_mul == 1.0:
            i = tf.floor(t / first)
            start = i * first
            length = tf.constant(first, tf.float32)
        else:
            i = tf.floor(tf.math.log(1.0 - t / first * (1.0 - self.t_mul)) / math.log(self.t_mul))
            start = first * (1.0 - self.t_mul**i) / (1.0 - self.t_mul)
            length = first * self.t_mul**i
        frac = tf.clip_by_value((t - start) / length, 0.0, 1.0)
        return frac, tf.pow(tf.constant(self.m_mul, tf.float32), i)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "alpha": self.alpha,
            "restart_steps": self.restart_steps,
            "t_mul": self.t_mul,
            "m_mul": self.m_mul,
        }
