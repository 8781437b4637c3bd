"""``edge-classify serve``: a DICOM node that answers scanners in DICOM (the ``node`` extra).

Scanners send by C-STORE; each instance is stored durably before it is acknowledged, classified
from the spool by the runtime's own pipeline, and answered with a Comprehensive SR (TID 1500) of
its most severe result (a cine's frame, a dual view's tissue region) and, for a single-frame
image with a lesion, a binary SEG of that result's lesion, written to a folder and optionally
forwarded to a PACS. One module per part: :mod:`.access` (who may associate), :mod:`.scp`
(receive), :mod:`.connections` (connections that do not associate: the ARTIM timeout; it imports
pynetdicom, once the node listens), :mod:`.spool` (store, exactly once), :mod:`.worker` (classify
and answer), :mod:`.answers` (SR and SEG), :mod:`.templates` (later instances of a layout encoded
from the first), :mod:`.journal` (JSON lines), :mod:`.forward` (send on), :mod:`.node` (the
whole).
Importing this package imports pydicom (the ``dicom`` extra), and neither pynetdicom nor
highdicom.
"""

from edge_runtime.app.node.access import AllowEntry, AllowList
from edge_runtime.app.node.answers import Answers, ModelIdentity, build_answers
from edge_runtime.app.node.forward import Destination, Forwarder, ForwardOptions, Outbox
from edge_runtime.app.node.node import Node, NodeOptions, server_ssl_context
from edge_runtime.app.node.scp import STORAGE_CLASSES, TRANSFER_SYNTAXES, ScpOptions, StorageScp
from edge_runtime.app.node.spool import Spool
from edge_runtime.app.node.worker import RESULTS_NAME, Worker

__all__ = [
    "RESULTS_NAME",
    "STORAGE_CLASSES",
    "TRANSFER_SYNTAXES",
    "AllowEntry",
    "AllowList",
    "Answers",
    "Destination",
    "ForwardOptions",
    "Forwarder",
    "ModelIdentity",
    "Node",
    "NodeOptions",
    "Outbox",
    "ScpOptions",
    "Spool",
    "StorageScp",
    "Worker",
    "build_answers",
    "server_ssl_context",
]
