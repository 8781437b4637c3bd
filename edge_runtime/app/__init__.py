"""The applications: the shell all three commands share (:mod:`.shell`, :mod:`.status`),
``edge-classify`` and its subcommands (:mod:`.cli`), the records it writes (:mod:`.output`),
``watch`` (:mod:`.watch`), ``bench`` (:mod:`.bench`), the Ray engine (:mod:`.ray_engine`), the
dashboard (:mod:`.dashboard`) and the DICOM node (:mod:`.node`). A new command, output format or
flag goes here."""
