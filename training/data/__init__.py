"""Training data: finding labelled scans (:mod:`.datasets`), grouping near-copies (:mod:`.dedup`),
grouped splits and folds (:mod:`.splits`), lesion masks (:mod:`.masks`) and the cached arrays
and tf.data pipeline (:mod:`.pipeline`)."""
