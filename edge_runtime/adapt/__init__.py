"""Site adaptation (``edge-classify adapt``, the ``adapt`` extra): refit a model's last layer on a
clinic's own labelled scans. The steps, one module each: read the site (:mod:`.site`), find and
replace the last layer in the graph (:mod:`.graph`), fit it (:mod:`.fit`), estimate it by the
site's cross-validation (:mod:`.evaluate`), keep the INT8 ranges right (:mod:`.quant`), and the
pipeline that runs them and writes the gated files (:mod:`.run`)."""

from edge_runtime.adapt.run import (
    AdaptOptions,
    AdaptRefused,
    AdaptReport,
    adapt,
    format_numbers,
    parent_calls,
)

__all__ = [
    "AdaptOptions",
    "AdaptRefused",
    "AdaptReport",
    "adapt",
    "format_numbers",
    "parent_calls",
]
