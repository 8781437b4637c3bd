"""The model layer: what an edge-classify ONNX file must be (:mod:`.contract`), its metadata
read without loading it (:mod:`.onnx_meta`), onnxruntime sessions and their on-disk cache
(:mod:`.session`, :mod:`.session_cache`), the CPU features that decide the precision
(:mod:`.cpu`), model cards (:mod:`.card`) and the gate every written model file passes
(:mod:`.verify`)."""
