"""LM students: distil a free-text route into a small causal LM (sequence- or token-level KD).

Light on purpose: the heavy modules (``train``, ``evaluate``, ``bench``) import torch and
transformers inside their functions. Public entry points:

- :class:`distiller.lm.config.LMTrainConfig` and :func:`distiller.lm.config.preset`
- :func:`distiller.lm.train.distill_lm_route` (ledger route -> registered ``lm`` student)
- :func:`bench.lm_student.run_lm_student_bench` (``kdgate bench lm-student``)
"""

__all__ = ["LMTrainConfig", "preset", "ConfigError"]

from distiller.lm.config import ConfigError, LMTrainConfig, preset
