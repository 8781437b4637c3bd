"""How a run is judged: metrics and calibration (:mod:`.metrics`), lesion outlines
(:mod:`.lesion_metrics`), plots (:mod:`.plots`), the scanner-held-out protocol
(:mod:`.protocol`) and the warnings a run earns (:mod:`.diagnostics`)."""
