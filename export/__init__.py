"""Keras run folder -> verified FP32 / INT8 (/ FP16) ONNX models with a model card.

Needs the ``export`` extra. The command is ``edge-export``; the work is in :mod:`export.pipeline`.
"""
