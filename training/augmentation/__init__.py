"""What training shows the model that the scans alone do not: augmentation (:mod:`.augment`),
screen clutter (:mod:`.clutter`), scanner styles (:mod:`.scanner_style`), burned-in marks
painted out (:mod:`.marks`) and lesion-free views (:mod:`.lesion_free`)."""
