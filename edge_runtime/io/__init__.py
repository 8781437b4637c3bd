"""The input layer: from the paths a user gives to the model's square input. Finding the files
(:mod:`.sources`), decoding images (:mod:`.decode`), DICOM (:mod:`.dicom`) and its ultrasound
regions (:mod:`.regions`), video cines (:mod:`.video`), decoder messages tied to their file
(:mod:`.capture`), the "is this a scan" check (:mod:`.scan_check`) and the letterbox into the
model's square (:mod:`.preprocess`, shared with training). A new decoder goes here."""
