"""Probes of a trained model on held-out scans (``python -m training.probes.<name> RUN``): does
it read burned-in marks (:mod:`.marks`), look at the lesion (:mod:`.attention`), reveal the
dataset (:mod:`.identity`), or need the lesion to call a scan abnormal (:mod:`.lesionfree`)? They
share :mod:`.checks` and hold no training code: what training also uses lives in
:mod:`training.augmentation` and :mod:`training.data`."""
