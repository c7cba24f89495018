"""The learned query-agnostic scorer: per-layer predictors of KVzip scores from hidden states, and their training.

``kvpress.scorer.predictor`` holds the model and its file format (imported by the ``learned`` policy);
``kvpress.scorer.train`` builds data from a teacher policy and fits predictors (``kvpress scorer train``).
"""

from kvpress.scorer.predictor import ScorePredictor, embedded_predictor, load_predictor, model_signature

__all__ = ["ScorePredictor", "load_predictor", "embedded_predictor", "model_signature"]
