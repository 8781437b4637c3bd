"""The Keras model: backbones (:mod:`.backbones`, :mod:`.efficientnet_lite` with its weights read
by :mod:`.torch_checkpoint`), registered layers (:mod:`.layers`), the classifier
(:mod:`.classifier`), the lesion head and its loss (:mod:`.segmentation`) and the INT8 weight
grid (:mod:`.int8_grid`)."""
