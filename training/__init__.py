"""Training a breast-ultrasound classifier on scan folders (``edge-train``; the ``train`` extra).

The pipeline is :mod:`training.run` (discover -> group -> split -> load -> fit -> evaluate ->
report), with :mod:`training.fit` and :mod:`training.distributed`; the layers it draws on are
:mod:`training.data`, :mod:`training.augmentation`, :mod:`training.model` and
:mod:`training.evaluation`. :mod:`training.probes` check a trained model; :mod:`training.synthetic`
makes test scans.
"""
