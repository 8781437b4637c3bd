"""Answers from templates: highdicom builds a layout's first instance; later ones are filled in.

highdicom builds and :func:`~pydicom.filewriter.dcmwrite` encodes an SR and a SEG in ~50 ms of
pure-Python CPU; the model takes ~3 ms. Yet within one layout (the same label and flags, the same
measurements, a SEG or none, the same source header where highdicom reads it) the answers differ
only in their values: UIDs, dates and times, the patient and study attributes copied from the
source, the probabilities and sizes, the SEG's pixels. So the first instance of a layout is built
by highdicom (and answered with that), a template of the encoded files is made from it, and the
next instances of the layout are encoded from the template in well under a millisecond.

How a template is made, so that what it encodes is what highdicom would build:

1. **What highdicom reads.** The first instance is built with its header's element dict swapped
   for one that records every tag looked up (present or not). Those tags' values (and absences)
   are the template's key: a later source is encoded from the template only where it agrees on
   every one of them, so highdicom would take the very same path through its code for it. An
   element copied verbatim into the answer's top level (the same element object: highdicom's
   Patient and Study modules) only has to be present; its value is copied in. The source's UIDs,
   acquisition date and time, and the patient and study values highdicom sets itself (name,
   ID, birth date, sex, accession number, study ID, date and time, referring physician) need
   only the same presence, type and emptiness, and to be values highdicom accepts.
2. **Where the values go.** A second build, from the same source and answer with every value
   changed (fresh source UIDs, other patient and study values, probabilities, sizes, frame, mask
   and acquisition time), is compared with the first, element by element: they must have the
   same elements in the same sequences; an element that differs is a slot, named by the value
   that gives it in both builds (or, for a UID no input gives, a UID generated afresh, as
   highdicom does). Dates and times of creation are slots from the clock; the SEG's Pixel Data
   is a slot from the mask.
3. **Checked.** Both builds, encoded from the template with their own values, must give back
   their encoded elements exactly, or there is no template. A layout whose templates cannot be
   made, or are never used again, :data:`MAX_TRIES` times is built by highdicom from then on.

Sequences and items are written with undefined lengths (ended by delimitation items, PS3.5 7.5),
so a value's length never changes a length around it. The files hold the same elements as
highdicom's (``tests/test_node_templates.py`` compares them element by element, and reads them
back with highdicom); only that encoding of the sequences differs from ``dcmwrite``'s.
"""

from __future__ import annotations

import copy
import datetime
import logging
import struct
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.app.node.answers import (
    AnswerFile,
    AnswerInputs,
    EncodedAnswers,
    ModelIdentity,
    answer_inputs,
    answer_uids,
    build_from_inputs,
    fill_type2,
    header_uids,
    tracking_uid,
)
from edge_runtime.classifier import Classification

log = logging.getLogger(__name__)

MAX_TEMPLATES = 64  # per process, least recently used dropped
MAX_TRIES = 3  # templates of one layout, never used or failed, before it is built every time

_PREAMBLE = b"\x00" * 128 + b"DICM"
_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_GROUP_LENGTH = 0x00020000
_PIXEL_DATA = 0x7FE00010
_META_PATH = ((0x0002, 0),)  # the walk's path of the file meta's elements
# values of the source that highdicom writes into the answers: slots, not part of the key
_SOURCE_UIDS = {0x00080018: "src_uid", 0x0020000E: "src_series", 0x0020000D: "src_study"}
# the Patient and Study attributes highdicom sets from the source's values (SOPClass arguments),
# beside copying its Patient and Study modules' elements as they are
_PATIENT_STUDY = {
    0x00100020: "PatientID",
    0x00100010: "PatientName",
    0x00100030: "PatientBirthDate",
    0x00100040: "PatientSex",
    0x00080050: "AccessionNumber",
    0x00200010: "StudyID",
    0x00080020: "StudyDate",
    0x00080030: "StudyTime",
    0x00080090: "ReferringPhysicianName",
}
_ACQUISITION = (0x0008002A, 0x00080022, 0x00080032)  # Acquisition DateTime, Date, Time
_TAG_OF = {keyword: tag for tag, keyword in _PATIENT_STUDY.items()}
# dates and times highdicom takes from its clock (ContentDate..., ContributionDateTime)
_CLOCK = {
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "SeriesDate",
    "SeriesTime",
    "ContributionDateTime",
}


class TemplateError(Exception):
    """No template can be made from these two builds (said why)."""


# ---------------------------------------------------------------- what highdicom reads


class _ReadLog(dict):
    """A dataset's element dict that records every tag looked up, present or not; ``bulk`` is
    set when it is iterated (then everything may have been read)."""

    def __init__(self, elements: dict, state: dict | None = None) -> None:
        super().__init__(elements)
        self.state = state if state is not None else {"read": set(), "bulk": False}

    def __getitem__(self, tag: Any) -> Any:
        self.state["read"].add(tag)
        return super().__getitem__(tag)

    def get(self, tag: Any, default: Any = None) -> Any:
        self.state["read"].add(tag)
        return super().get(tag, default)

    def __contains__(self, tag: object) -> bool:
        self.state["read"].add(tag)
        return super().__contains__(tag)

    def _bulk(self) -> None:
        self.state["bulk"] = True

    def keys(self):  # type: ignore[override]
        self._bulk()
        return super().keys()

    def items(self):  # type: ignore[override]
        self._bulk()
        return super().items()

    def values(self):  # type: ignore[override]
        self._bulk()
        return super().values()

    def __iter__(self):  # type: ignore[override]
        self._bulk()
        return super().__iter__()

    def copy(self) -> _ReadLog:  # type: ignore[override]
        return _ReadLog(dict(dict.items(self)), self.state)  # its reads: the source's


# ---------------------------------------------------------------- encoding


def _element_bytes(elem: Any, encodings: Any) -> bytes:
    """One element as pydicom writes it in Explicit VR Little Endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_data_element(buffer, elem, encodings)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Leaf:
    """An element that is not a sequence, where the walk met it."""

    path: tuple[tuple[int, int], ...]  # (sequence tag, item index) down to it
    tag: int
    vr: str
    elem: Any
    encodings: Any
    data: bytes


def _walk(ds: Any, encodings: Any, path: tuple = ()) -> Iterator[bytes | _Leaf]:
    """A dataset's encoding, sequences with undefined lengths, as literal bytes and leaves."""
    from pydicom.filewriter import correct_ambiguous_vr

    if not path:
        correct_ambiguous_vr(ds, True)
    encodings = ds.get("SpecificCharacterSet", encodings)
    for tag in sorted(dict.keys(ds._dict)):
        if tag.element == 0 and tag.group > 6:  # retired group lengths: not written
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            yield struct.pack("<HH", tag.group, tag.element) + b"SQ\x00\x00\xff\xff\xff\xff"
            for index, item in enumerate(elem.value):
                yield _ITEM
                yield from _walk(item, encodings, (*path, (int(tag), index)))
                yield _ITEM_END
            yield _SEQUENCE_END
        else:
            yield _Leaf(path, int(tag), elem.VR, elem, encodings, _element_bytes(elem, encodings))


def _walk_file(ds: Any) -> list[bytes | _Leaf]:
    """A built answer as a Part 10 file (after ``dcmwrite`` completed its file meta)."""
    from pydicom.charset import default_encoding
    from pydicom.uid import ExplicitVRLittleEndian

    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise TemplateError(f"transfer syntax {ds.file_meta.TransferSyntaxUID}")
    return [
        _PREAMBLE,
        *_walk(ds.file_meta, default_encoding, _META_PATH),
        *_walk(ds, default_encoding),
    ]


def encoded(ds: Any) -> bytes:
    """A built answer as highdicom's users write it (``dcmwrite``), file meta completed."""
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------- values


def _acquisition(source: Any) -> Any:
    """The source's acquisition date and time as highdicom takes it for the Contributing
    Equipment (``ContributingEquipment.for_image_acquisition``), or None."""
    value = source.get("AcquisitionDateTime")
    if value is None:
        date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
        if isinstance(date, datetime.date) and isinstance(time, datetime.time):
            value = datetime.datetime.combine(date, time)
    return value


def _values(source: Any, inputs: AnswerInputs, model: ModelIdentity) -> dict[str, Any]:
    """Every value of one instance that its answers hold, by name."""
    source_uid = str(source.SOPInstanceUID)
    sr_uid, sr_series, seg_uid, seg_series = answer_uids(
        source_uid, str(source.get("StudyInstanceUID", "")), model
    )
    values: dict[str, Any] = {
        "sr_uid": sr_uid,
        "sr_series": sr_series,
        "seg_uid": seg_uid,
        "seg_series": seg_series,
        "tracking": tracking_uid(source_uid),
        "src_uid": source_uid,
        "src_series": str(source.SeriesInstanceUID),
        "src_study": str(source.StudyInstanceUID),
        "area": inputs.area_mm2,
        "diameter": inputs.diameter_mm,
        "frame": inputs.frame_number,
        "acquisition": _acquisition(source),
    }
    values.update({f"p:{name}": p for name, p in inputs.probabilities})
    values.update(
        {f"src:{keyword}": source[tag].value for tag, keyword in _PATIENT_STUDY.items()
         if tag in source._dict}
    )  # fmt: skip
    return {name: value for name, value in values.items() if value is not None}


def _fills(name: str, vr: str, source: Any) -> bool:
    """Whether the value named ``name`` (:func:`_values`) may fill an element of ``vr``."""
    if name.startswith("p:") or name in ("area", "diameter"):
        return vr in ("DS", "FD", "FL")
    if name == "frame":
        return vr in ("IS", "US", "UL", "SS", "SL")
    if name == "acquisition":
        return vr == "DT"
    if name.startswith("src:"):
        own = source[_TAG_OF[name[4:]]].VR
        return own == vr  # a source value fills an element of its own kind
    return vr == "UI"


def _as_vr(value: Any, vr: str) -> Any:
    """A value as highdicom sets it for an element of ``vr``."""
    from pydicom.valuerep import DS, DT, IS

    if vr == "DS":
        return DS(value, auto_format=True)
    if vr == "IS":
        return IS(value)
    if vr in ("FD", "FL"):
        return float(value)
    if vr == "DT":
        return DT(value)
    if vr == "UI":
        return str(value)
    return value


def _value_bytes(tag: int, vr: str, value: Any, encodings: Any) -> bytes:
    """An element holding ``value`` as highdicom sets it; UIDs and numbers written here as
    pydicom writes them (a template is checked against pydicom's bytes when it is made)."""
    value = _as_vr(value, vr)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if vr in ("UI", "DS", "IS") and isinstance(value, (str, int, float)):
        text = getattr(value, "original_string", None) or str(value)
        data = text.encode("ascii")
        if len(data) % 2:
            data += b"\x00" if vr == "UI" else b" "
        if len(data) <= 0xFFFF:
            return head + vr.encode() + struct.pack("<H", len(data)) + data
    if vr == "FD" and isinstance(value, float):
        return head + b"FD\x08\x00" + struct.pack("<d", value)
    from pydicom.dataelem import DataElement

    return _element_bytes(DataElement(tag, vr, value), encodings)


def _mask_bytes(mask: np.ndarray) -> bytes:
    """A binary SEG frame's Pixel Data value (bits packed, padded to an even length)."""
    from pydicom.pixels.utils import pack_bits

    return pack_bits(mask.astype(np.uint8).ravel())


# ---------------------------------------------------------------- slots


@dataclass
class _Fill:
    """What one instance puts into a template."""

    source: Any
    values: dict[str, Any]
    mask: np.ndarray | None
    now: datetime.datetime
    fresh: dict[int, str] = field(default_factory=dict)  # group -> new UID
    seen: dict[int, bytes] | None = None  # slot id -> the bytes a build had (the check)
    done: dict[tuple, bytes] = field(default_factory=dict)  # what recurs, encoded once


@dataclass(frozen=True)
class _Slot:
    tag: int
    vr: str
    encodings: Any

    def render(self, fill: _Fill) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True)
class _Value(_Slot):
    """One of :func:`_values`."""

    name: str

    def render(self, fill: _Fill) -> bytes:
        key = (self.name, self.tag, self.vr, str(self.encodings))
        data = fill.done.get(key)
        if data is None:
            data = fill.done[key] = _value_bytes(
                self.tag, self.vr, fill.values[self.name], self.encodings
            )
        return data


@dataclass(frozen=True)
class _Copied(_Slot):
    """The source's own element, copied into the answer's top level."""

    def render(self, fill: _Fill) -> bytes:
        key = ("copied", self.tag, str(self.encodings))
        data = fill.done.get(key)
        if data is None:
            data = fill.done[key] = _element_bytes(fill.source[self.tag], self.encodings)
        return data


@dataclass(frozen=True)
class _Clock(_Slot):
    """A date or time of creation: now."""

    def render(self, fill: _Fill) -> bytes:
        if fill.seen is not None:
            return fill.seen[id(self)]
        from pydicom.valuerep import DA, DT, TM

        now = fill.now
        value = {"DA": lambda: DA(now.date()), "TM": lambda: TM(now.time())}.get(
            self.vr, lambda: DT(now)
        )()
        return _value_bytes(self.tag, self.vr, value, self.encodings)


@dataclass(frozen=True)
class _Fresh(_Slot):
    """A UID that highdicom generates for each build (the same one wherever it recurs)."""

    group: int

    def render(self, fill: _Fill) -> bytes:
        if fill.seen is not None:
            return fill.seen[id(self)]
        from pydicom.uid import generate_uid

        uid = fill.fresh.get(self.group)
        if uid is None:
            uid = fill.fresh[self.group] = str(generate_uid())
        return _value_bytes(self.tag, self.vr, uid, self.encodings)


@dataclass(frozen=True)
class _Mask(_Slot):
    """The SEG's Pixel Data."""

    def render(self, fill: _Fill) -> bytes:
        from pydicom.dataelem import DataElement

        return _element_bytes(DataElement(self.tag, self.vr, _mask_bytes(fill.mask)), None)


@dataclass(frozen=True)
class _FileTemplate:
    """One answer file: its file meta and its data set, as literal bytes and slots."""

    meta: tuple[bytes | _Slot, ...]  # after the File Meta Information Group Length
    body: tuple[bytes | _Slot, ...]

    def render(self, fill: _Fill) -> bytes:
        meta = b"".join(p if type(p) is bytes else p.render(fill) for p in self.meta)
        body = b"".join(p if type(p) is bytes else p.render(fill) for p in self.body)
        length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(meta))
        return _PREAMBLE + length + meta + body


def _file_template(
    first: list[bytes | _Leaf],
    second: list[bytes | _Leaf],
    fills: tuple[_Fill, _Fill],
    copied: set[int],
) -> _FileTemplate:
    """The template of two builds of one layout (see the module docstring)."""
    if len(first) != len(second):
        raise TemplateError(f"{len(first)} and {len(second)} elements")
    meta: list[bytes | _Slot] = []
    body: list[bytes | _Slot] = []
    fresh: dict[bytes, tuple[int, bytes]] = {}
    seen: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})
    for a, b in zip(first, second, strict=True):
        if isinstance(a, bytes) or isinstance(b, bytes):
            if a != b:
                raise TemplateError("the sequences differ")
            parts = body if a is not _PREAMBLE else meta
            if a is not _PREAMBLE:
                parts.append(a)
            continue
        if (a.path, a.tag, a.vr) != (b.path, b.tag, b.vr):
            raise TemplateError(f"({a.tag:08X}) and ({b.tag:08X}) at the same place")
        parts = meta if _in_meta(a) else body
        if a.tag == _GROUP_LENGTH:
            continue  # written from the meta's length
        slot = _slot(a, b, fills, copied, fresh)
        if slot is None:
            if a.data != b.data:
                raise TemplateError(f"({a.tag:08X}) differs and no value gives it")
            parts.append(a.data)
            continue
        seen[0][id(slot)], seen[1][id(slot)] = a.data, b.data
        parts.append(slot)
    template = _FileTemplate(tuple(_joined(meta)), tuple(_joined(body)))
    for fill, build, observed in zip(fills, (first, second), seen, strict=True):
        check = _Fill(fill.source, fill.values, fill.mask, fill.now, seen=observed)
        expected = _FileTemplate(
            tuple(p.data for p in build if _in_meta(p) and p.tag != _GROUP_LENGTH),
            tuple(p if isinstance(p, bytes) else p.data for p in build[1:] if not _in_meta(p)),
        ).render(check)  # the group length as dcmwrite writes it (highdicom's may be stale)
        rendered = template.render(check)
        if rendered != expected:
            at = next(
                (i for i, (x, y) in enumerate(zip(rendered, expected, strict=False)) if x != y),
                min(len(rendered), len(expected)),
            )
            raise TemplateError(
                f"the template does not give back its build (at byte {at}: "
                f"{rendered[at - 16 : at + 16]!r} for {expected[at - 16 : at + 16]!r})"
            )
    return template


def _gives(leaf: _Leaf, value: Any) -> bool:
    """Whether ``value`` encodes to ``leaf``."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _value_bytes(leaf.tag, leaf.vr, value, leaf.encodings) == leaf.data
    except Exception:  # a value of another kind: pydicom raises many types
        return False


def _in_meta(part: bytes | _Leaf) -> bool:
    return isinstance(part, _Leaf) and part.path[:1] == _META_PATH


def _slot(
    a: _Leaf,
    b: _Leaf,
    fills: tuple[_Fill, _Fill],
    copied: set[int],
    fresh: dict[bytes, tuple[int, bytes]],
) -> _Slot | None:
    """The slot of one element of the two builds; None: the same literal in every instance."""
    from pydicom.datadict import keyword_for_tag

    if not a.path and a.tag in copied:
        if a.elem is not fills[0].source.get_item(a.tag) or b.elem is not fills[1].source.get_item(
            a.tag
        ):
            raise TemplateError(f"({a.tag:08X}) copied in one build only")
        return _Copied(a.tag, a.vr, a.encodings)
    if not a.path and a.tag == _PIXEL_DATA and fills[0].mask is not None:
        return _Mask(a.tag, a.vr, a.encodings)
    if a.data != b.data:
        names = [
            name
            for name, value in fills[0].values.items()
            if name in fills[1].values
            and _fills(name, a.vr, fills[0].source)
            and _gives(a, value)
            and _gives(b, fills[1].values[name])
        ]
        if len(names) == 1:
            return _Value(a.tag, a.vr, a.encodings, names[0])
        if len(names) > 1:
            raise TemplateError(f"({a.tag:08X}) is given by {names}")
    if a.vr in ("DA", "TM", "DT") and keyword_for_tag(a.tag) in _CLOCK:
        return _Clock(a.tag, a.vr, a.encodings)
    if a.data != b.data and a.vr == "UI":
        group, other = fresh.setdefault(a.data[8:], (len(fresh), b.data[8:]))
        if other != b.data[8:]:
            raise TemplateError(f"({a.tag:08X}): a generated UID recurs in one build only")
        return _Fresh(a.tag, a.vr, a.encodings, group)
    return None


def _joined(parts: list[bytes | _Slot]) -> Iterator[bytes | _Slot]:
    """Adjacent literal bytes as one."""
    pending: list[bytes] = []
    for part in parts:
        if isinstance(part, bytes):
            pending.append(part)
            continue
        if pending:
            yield b"".join(pending)
            pending = []
        yield part
    if pending:
        yield b"".join(pending)


# ---------------------------------------------------------------- the key


_PRESENT = "present"


def _shape(source: Any, tag: int) -> Any:
    """Presence, type and emptiness of a source value that only fills a slot."""
    if tag not in source._dict:
        return None
    value = source[tag].value
    return (type(value).__name__, value in (None, "", b""))


def _key_entry(source: Any, tag: int, copied: set[int]) -> Any:
    if tag in _SOURCE_UIDS or tag in _ACQUISITION or tag in _PATIENT_STUDY:
        return _shape(source, tag)
    if tag not in source._dict:
        return None
    if tag in copied:
        return _PRESENT
    return _element_bytes(source[tag], source.get("SpecificCharacterSet"))


def _highdicom_takes(source: Any) -> bool:
    """Whether highdicom accepts the source's patient and study values that it checks (a date,
    a time, Patient's Sex): where it would refuse them, a template must not answer either."""
    from highdicom.enum import PatientSexValues
    from pydicom.valuerep import DA, TM

    try:
        for keyword, check in (
            ("PatientBirthDate", DA),
            ("StudyDate", DA),
            ("StudyTime", TM),
            ("PatientSex", lambda v: v in (None, "") or PatientSexValues(v)),
        ):
            check(source.get(keyword))
    except (ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class _Template:
    """The SR (and SEG) of one layout, and the source header it holds for."""

    key_tags: tuple[int, ...]
    key: tuple[Any, ...]
    copied: frozenset[int]
    sr: _FileTemplate
    seg: _FileTemplate | None

    def fits(self, source: Any) -> bool:
        return _highdicom_takes(source) and all(
            _key_entry(source, tag, self.copied) == want
            for tag, want in zip(self.key_tags, self.key, strict=True)
        )

    def encode(
        self, source: Any, inputs: AnswerInputs, model: ModelIdentity
    ) -> tuple[tuple[str, str, bytes], ...]:
        values = _values(source, inputs, model)
        fill = _Fill(source, values, inputs.mask, datetime.datetime.now())
        files = []
        if self.seg is not None:
            files.append(("SEG", values["seg_uid"], self.seg.render(fill)))
        files.append(("SR", values["sr_uid"], self.sr.render(fill)))
        return tuple(files)


def _changed(source: Any, inputs: AnswerInputs) -> tuple[Any, AnswerInputs]:
    """The same layout with every value changed (the second build)."""
    import dataclasses

    from pydicom.dataelem import DataElement
    from pydicom.uid import generate_uid
    from pydicom.valuerep import DA, TM

    other = copy.copy(source)
    # its own elements dict, and new elements where values change: the source's stay as they are
    other._dict = dict(dict.items(source._dict))
    for tag in _SOURCE_UIDS:
        if tag in other._dict:
            other[tag] = DataElement(tag, "UI", str(generate_uid()))
    acquired = other.get("AcquisitionDateTime")
    if acquired:
        other[0x0008002A] = DataElement(
            0x0008002A, "DT", "19990203040506.070809" if acquired != "19990203040506.070809"
            else "19980203040506"
        )  # fmt: skip
    elif isinstance(other.get("AcquisitionDate"), datetime.date) and isinstance(
        other.get("AcquisitionTime"), datetime.time
    ):
        moved = datetime.datetime.combine(other.AcquisitionDate, other.AcquisitionTime)
        moved += datetime.timedelta(days=1, seconds=1, microseconds=1)
        other[0x00080022] = DataElement(0x00080022, "DA", DA(moved.date()))
        other[0x00080032] = DataElement(0x00080032, "TM", TM(moved.time()))
    for index, tag in enumerate(_PATIENT_STUDY):
        if tag in other._dict and other[tag].value not in (None, ""):  # empty ones stay empty
            vr = other[tag].VR
            value = _other_value(vr, index, str(other[tag].value))
            other[tag] = DataElement(tag, vr, value)
    probabilities = tuple(
        (name, (p + 0.1 * (index + 1) + 0.0123456789) % 1.0)
        for index, (name, p) in enumerate(inputs.probabilities)
    )
    mask = None
    if inputs.mask is not None:
        mask = inputs.mask.copy()
        mask[0, 0] = not mask[0, 0]
        if not mask.any():
            mask[0, 1] = True
    frame = inputs.frame_number
    changed = dataclasses.replace(
        inputs,
        probabilities=probabilities,
        area_mm2=None if inputs.area_mm2 is None else inputs.area_mm2 * 1.5 + 1.25,
        diameter_mm=None if inputs.diameter_mm is None else inputs.diameter_mm * 1.5 + 2.5,
        frame_number=None if frame is None else frame + 1,
        mask=mask,
    )
    return other, changed


def _other_value(vr: str, index: int, value: str) -> str:
    """A valid value of ``vr``, other than ``value``, and other than those of other indexes."""
    if vr == "DA":
        candidates = [(datetime.date(1990, 1, 1) + datetime.timedelta(days=index + k)).strftime(
            "%Y%m%d") for k in (0, 20)]  # fmt: skip
    elif vr == "TM":
        candidates = [f"{index + 1:02d}{k:02d}07" for k in (5, 6)]
    elif vr == "PN":
        candidates = [f"Other^Name{index}", f"Another^Name{index}"]
    elif vr == "CS":
        candidates = ["M", "F"]
    else:
        candidates = [f"OTHER{index}", f"ANOTHER{index}"]
    return next(c for c in candidates if c != value)


def _copied(ds: Any, source: Any) -> set[int]:
    """Tags of the elements highdicom copied from ``source`` into ``ds``'s top level (the very
    element objects)."""
    return {int(tag) for tag, elem in dict.items(ds._dict) if dict.get(source._dict, tag) is elem}


def make_template(
    source: Any, inputs: AnswerInputs, model: ModelIdentity
) -> tuple[tuple[tuple[str, str, bytes], ...], _Template | None]:
    """Build ``source``'s answers with highdicom and, where it can, their layout's template.

    Returns:
        The answer files ((prefix, SOP Instance UID, bytes), SEG first) and the template, or
        None (said why at debug level).

    Raises:
        ValueError: as :func:`~edge_runtime.app.node.answers.build_answers` (the first build;
            the second one's failure only means no template).
    """
    for tag in list(dict.keys(source._dict)):
        source[tag]  # raw elements converted now: highdicom's copies are then these very objects
    readlog = _ReadLog(source._dict)
    source.__dict__["_dict"] = readlog
    try:
        answers = build_from_inputs(source, inputs, model)
    finally:
        source.__dict__["_dict"] = dict(dict.items(readlog))
    files = tuple(
        (prefix, str(ds.SOPInstanceUID), encoded(ds))
        for prefix, ds in (("SEG", answers.seg), ("SR", answers.sr))
        if ds is not None
    )
    try:
        if readlog.state["bulk"]:
            raise TemplateError("highdicom went through the whole source header")
        other, changed = _changed(source, inputs)
        second = build_from_inputs(other, changed, model)
        for ds in (second.sr, second.seg):
            if ds is not None:
                encoded(ds)  # completes its file meta as for the first
        now = datetime.datetime.now()
        fills = (
            _Fill(source, _values(source, inputs, model), inputs.mask, now),
            _Fill(other, _values(other, changed, model), changed.mask, now),
        )
        made = {}
        copied: set[int] = set()
        for name in ("sr", "seg"):
            first_ds, second_ds = getattr(answers, name), getattr(second, name)
            if first_ds is None:
                continue
            in_file = _copied(first_ds, source)
            if _copied(second_ds, other) != in_file:
                raise TemplateError(
                    f"the two builds copied different elements: "
                    f"{sorted(map(hex, in_file - _copied(second_ds, other)))} "
                    f"{sorted(map(hex, _copied(second_ds, other) - in_file))}"
                )
            copied |= in_file
            made[name] = _file_template(_walk_file(first_ds), _walk_file(second_ds), fills, in_file)
        sr, seg = made["sr"], made.get("seg")
    except Exception as exc:  # TemplateError, or highdicom refused the changed values
        log.debug("no template for layout %s: %s: %s", inputs.layout(), type(exc).__name__, exc)
        return files, None
    read = {int(tag) for tag in readlog.state["read"] if isinstance(tag, int)}
    key_tags = tuple(
        sorted(read | copied | set(_SOURCE_UIDS) | set(_ACQUISITION) | set(_PATIENT_STUDY))
    )
    key = tuple(_key_entry(source, tag, copied) for tag in key_tags)
    return files, _Template(key_tags, key, frozenset(copied), sr, seg)


# ---------------------------------------------------------------- the cache


class AnswerTemplates:
    """One model's templates in this process, by layout (see the module docstring).

    A layout whose templates are never used again (its sources differ, every time, where
    highdicom reads them) or cannot be made (:data:`MAX_TRIES` times) is built by highdicom
    from then on, without the second build a template costs.
    """

    def __init__(self, model: ModelIdentity, *, max_templates: int = MAX_TEMPLATES) -> None:
        self.model, self.max_templates = model, max_templates
        self._templates: OrderedDict[tuple, list[_Template]] = OrderedDict()
        self._tries: Counter[tuple] = Counter()  # templates made or failed, per layout
        self._used: Counter[tuple] = Counter()  # instances encoded from them
        self._lock = threading.Lock()
        self.built = self.filled = 0  # instances built by highdicom / encoded from a template

    def encode(
        self, source: Any, inputs: AnswerInputs, frames: int = 1
    ) -> tuple[tuple[str, str, bytes], ...]:
        """The answer files of one instance ((prefix, SOP Instance UID, bytes), SEG first);
        ``source`` with its Type 2 attributes filled.

        Raises:
            ValueError: as :func:`~edge_runtime.app.node.answers.build_answers`.
        """
        layout = (*inputs.layout(), frames, _transfer_syntax(source))
        with self._lock:
            for template in self._templates.get(layout, ()):
                if template.fits(source):
                    self._templates.move_to_end(layout)
                    self._used[layout] += 1
                    self.filled += 1
                    return template.encode(source, inputs, self.model)
            self.built += 1
            if self._tries[layout] >= MAX_TRIES and not self._used[layout]:
                return _built(source, inputs, self.model)
            self._tries[layout] += 1
            files, template = make_template(source, inputs, self.model)
            if template is not None:
                self._keep(layout, template)
            return files

    def _keep(self, layout: tuple, template: _Template) -> None:
        self._templates.setdefault(layout, []).append(template)
        self._templates.move_to_end(layout)
        while sum(len(kept) for kept in self._templates.values()) > self.max_templates:
            oldest = next(iter(self._templates))
            self._templates[oldest].pop(0)
            if not self._templates[oldest]:
                del self._templates[oldest]


def _built(
    source: Any, inputs: AnswerInputs, model: ModelIdentity
) -> tuple[tuple[str, str, bytes], ...]:
    answers = build_from_inputs(source, inputs, model)
    return tuple(
        (prefix, str(ds.SOPInstanceUID), encoded(ds))
        for prefix, ds in (("SEG", answers.seg), ("SR", answers.sr))
        if ds is not None
    )


def _transfer_syntax(source: Any) -> str:
    meta = getattr(source, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


_BY_MODEL: dict[ModelIdentity, AnswerTemplates] = {}
_BY_MODEL_LOCK = threading.Lock()


def templates_for(model: ModelIdentity) -> AnswerTemplates:
    """This process's templates for ``model``."""
    with _BY_MODEL_LOCK:
        templates = _BY_MODEL.get(model)
        if templates is None:
            templates = _BY_MODEL[model] = AnswerTemplates(model)
        return templates


def encode_answers(
    source_path: str, answer: Classification, model: ModelIdentity
) -> EncodedAnswers:
    """Build and encode the answers to the instance stored at ``source_path`` (SEG first), with
    the header UIDs of its JSON records (read here, so the node need not read the file again).

    A plain function of picklable arguments, so that the node runs it in worker processes:
    highdicom's builders are pure Python and would otherwise hold the interpreter's lock that the
    associations and the forwarder need. Each process keeps the templates of the layouts it has
    answered (this module): highdicom builds the first instance of a layout, later ones are
    encoded from its template with their own values put in.

    Raises:
        ValueError: as :func:`~edge_runtime.app.node.answers.build_answers`.
        OSError: the file cannot be read.
    """
    from pydicom import dcmread

    source = dcmread(source_path, stop_before_pixels=True)
    frames = int(source.get("NumberOfFrames", 1) or 1)
    header = header_uids(source)
    fill_type2(source)
    files = templates_for(model).encode(source, answer_inputs(source, answer, frames), frames)
    return EncodedAnswers(tuple(AnswerFile(*file) for file in files), header)
