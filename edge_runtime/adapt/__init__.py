"""Site adaptation (``edge-classify adapt``, the ``adapt`` extra): refit a model's last layer on a
clinic's own labelled scans. The steps, one module each: load the parent (:mod:`.parent`), check
where the files go (:mod:`.place`), read the site's list (:mod:`.site`) and its scans
(:mod:`.scans`), find and replace the last layer in the graph (:mod:`.graph`), fit it
(:mod:`.fit`), estimate it by the site's cross-validation (:mod:`.evaluate`), keep the INT8
ranges right (:mod:`.quant`), write and gate the files (:mod:`.write`) and their card
(:mod:`.card`); :mod:`.run` is the pipeline of those steps, :mod:`.options` what it is asked and
reports."""

from edge_runtime.adapt.card import format_numbers
from edge_runtime.adapt.options import AdaptOptions, AdaptRefused, AdaptReport
from edge_runtime.adapt.run import adapt, parent_calls

__all__ = [
    "AdaptOptions",
    "AdaptRefused",
    "AdaptReport",
    "adapt",
    "format_numbers",
    "parent_calls",
]
