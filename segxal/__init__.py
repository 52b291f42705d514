"""SegXAL: models and maths for explainable active learning and anomaly segmentation.

Importable without Ray or MLflow; nothing happens at import time.
"""

__version__ = "0.1.0"
