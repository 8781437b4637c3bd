"""From the model's outputs to what a user reads: calibration (:mod:`.calibration`), the calls
and the unfamiliar-scan flag (:mod:`.decision`), the FP32 recheck (:mod:`.recheck`), the lesion
outline (:mod:`.lesion`), heatmaps (:mod:`.heatmap`) and one summary per multi-frame file
(:mod:`.summary`). A new decision rule goes here, once, and training and export call it."""
