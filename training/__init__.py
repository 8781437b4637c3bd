"""Training a breast-ultrasound classifier on scan folders (``edge-train``).

Needs the ``train`` extra. The pipeline is in :mod:`training.run`.
"""
