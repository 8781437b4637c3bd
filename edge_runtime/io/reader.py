"""Reading scans for the model: every input (file, folder entry, array) decoded, checked and
fitted into the model's square in a thread pool, a batch of frames at a time, in input order.

:class:`ScanReader` is the decode half of :class:`edge_runtime.classifier.Classifier`, and what
``edge-classify adapt`` reads a site's scans with: OpenCV's and pydicom's decoders release the GIL,
so the pool decodes a few batches ahead of inference on every core; a file of many frames (a cine,
a multi-page TIFF, a video) is read one batch of frames at a time, so memory follows
``batch_size``, never the length of the file. What decoders print while reading a file is logged
under its name (:mod:`edge_runtime.io.capture`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from edge_runtime.io.capture import collecting, private_stderr
from edge_runtime.io.decode import InputError, Scan, display_path, open_scan, to_gray_uint8
from edge_runtime.io.preprocess import fit_to_square
from edge_runtime.io.scan_check import check_scan
from edge_runtime.model.contract import ResizePolicy

__all__ = ["MIN_SIDE", "DecodedItem", "ScanReader", "Source"]

MIN_SIDE = 32  # pixels; a smaller image cannot hold a scan
Source = str | os.PathLike[str] | np.ndarray
log = logging.getLogger(__name__)


@dataclass
class DecodedItem:
    """One image (or frame, or tissue region) read for the model: its square, or why not."""

    source: str
    frame: int | None
    square: np.ndarray | None = None
    original: np.ndarray | None = None
    error: str | None = None
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    pixel_spacing_mm: tuple[float, float] | None = None
    notes: tuple[str, ...] = ()  # what decoders printed or warned while reading the file
    not_a_scan: str | None = None  # the input check's reason (edge_runtime.io.scan_check)
    region: int | None = None
    origin: tuple[int, int] = (0, 0)  # (x, y) of the image in its frame (a tissue region)
    frame_shape: tuple[int, int] | None = None  # (rows, columns) of that frame; None: the image


@dataclass(frozen=True)
class _Chunk:
    """Decoded items of one file, and the decoding of its next frames, if any are left."""

    items: list[DecodedItem]
    rest: tuple[Scan, int] | None = None  # (scan, first frame not yet decoded)


class ScanReader:
    """Decodes inputs into the model's square input in a thread pool (module docstring).

    Args:
        input_size: the side ``S`` of the model's square input.
        resize_policy: how a frame is fitted into it.
        batch_size: frames per task; a long file is read this many frames at a time.
        decode_workers: threads of the pool.
        check_input: run the "is this a scan" check (:mod:`edge_runtime.io.scan_check`).
    """

    def __init__(
        self,
        input_size: int,
        resize_policy: ResizePolicy,
        *,
        batch_size: int = 8,
        decode_workers: int = 1,
        check_input: bool = True,
    ) -> None:
        self._size, self._policy = input_size, resize_policy
        self._batch_size, self._workers, self._check = batch_size, decode_workers, check_input
        self._pool = ThreadPoolExecutor(
            decode_workers, thread_name_prefix="decode", initializer=private_stderr
        )

    def close(self) -> None:
        """Stop the decode threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ScanReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def squares(
        self, sources: Iterable[Source]
    ) -> Iterator[tuple[str, int | None, np.ndarray | None, str | None]]:
        """``(source, frame, uint8 [S, S] or None, error or None)`` per image or frame, in input
        order, exactly as the classifier reads them."""
        for items in self.items(sources, keep_original=False):
            for item in items:
                yield item.source, item.frame, item.square, item.error

    def items(self, sources: Iterable[Source], keep_original: bool) -> Iterator[list[DecodedItem]]:
        """Items in input order, decoded in the pool: about two batches of frames ahead of the
        model, one batch of frames per task (a long file is read in several, one after the
        other)."""
        size = self._batch_size
        budget = size * 2 + self._workers
        window: deque[tuple[Future[_Chunk], int]] = deque()
        in_flight = 0
        remaining = iter(sources)
        exhausted = False
        while True:
            while not exhausted and in_flight < budget:
                source = next(remaining, _END)
                if source is _END:
                    exhausted = True
                    break
                window.append((self._pool.submit(self._decode, source, keep_original), 1))
                in_flight += 1
            if not window:
                return
            future, weight = window.popleft()
            in_flight -= weight
            chunk = future.result()
            if chunk.rest is not None:  # the file's next frames come before the next file
                scan, start = chunk.rest
                task = self._pool.submit(self._decode_frames, scan, start, keep_original)
                window.appendleft((task, size))
                in_flight += size
            for item in chunk.items:
                for message in item.notes:
                    where = "" if item.frame is None else f" [frame {item.frame}]"
                    log.warning("%s%s: %s", display_path(item.source), where, message)
            yield chunk.items

    def _decode(self, source: Source, keep_original: bool) -> _Chunk:
        """Open one source and decode its first batch of frames (a task of the pool)."""
        name = "<array>" if isinstance(source, np.ndarray) else os.fspath(source)
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        start = time.perf_counter()
        scan: Scan | None = None
        with collecting() as notes:
            try:
                if isinstance(source, np.ndarray):
                    images, stopped = [to_gray_uint8(source, name)], True
                else:
                    scan = open_scan(source)
                    images, stopped = _read_images(scan, 0, self._batch_size)
            except Exception as exc:  # a decoder bug must cost one input, never the batch
                images, stopped = [_reason(exc)], True
        if not images:
            images = ["holds no image"]
        decode_ms = _ms_since(start) / len(images)
        items = self._squares(name, images, 0, scan, keep_original, decode_ms)
        items[0] = replace(items[0], notes=tuple(notes))
        more = scan is not None and not stopped and len(images) < scan.count
        return _Chunk(items, (scan, len(images)) if more else None)

    def _decode_frames(self, scan: Scan, start: int, keep_original: bool) -> _Chunk:
        """Decode the next batch of a multi-frame file's frames (a task of the pool)."""
        begin = time.perf_counter()
        stop = min(start + self._batch_size, scan.count)
        with collecting() as notes:
            images, stopped = _read_images(scan, start, stop)
        decode_ms = _ms_since(begin) / max(1, len(images))
        items = self._squares(scan.path, images, start, scan, keep_original, decode_ms)
        if notes:
            items[0] = replace(items[0], notes=tuple(notes))
        return _Chunk(items, (scan, stop) if not stopped and stop < scan.count else None)

    def _squares(
        self,
        name: str,
        images: list[np.ndarray | str],
        first: int,
        scan: Scan | None,
        keep_original: bool,
        decode_ms: float,
    ) -> list[DecodedItem]:
        """Fit each image (image ``first``, ``first + 1``, ... of ``scan``; None: an array) into
        the model's square; an image that did not decode (its reason, a string) or is too small
        to hold a scan fails."""
        items = []
        for index, frame in enumerate(images, first):
            begin = time.perf_counter()
            number, region, spacing = (None, None, None) if scan is None else scan.where(index)
            if isinstance(frame, str):
                failed = DecodedItem(name, number, error=frame, decode_ms=decode_ms, region=region)
                items.append(failed)
                continue
            height, width = frame.shape
            if min(height, width) < MIN_SIDE:
                reason = (
                    f"image is {width} x {height} pixels, too small to hold a scan (each side "
                    f"must be at least {MIN_SIDE} pixels)"
                )
                failed = DecodedItem(name, number, error=reason, decode_ms=decode_ms, region=region)
                items.append(failed)
                continue
            try:
                square = fit_to_square(frame, self._size, self._policy)
            except Exception as exc:  # a bug here must cost one frame, never the batch
                reason = f"could not be resized ({type(exc).__name__}: {exc})"
                failed = DecodedItem(name, number, error=reason, decode_ms=decode_ms, region=region)
                items.append(failed)
                continue
            not_a_scan = _input_check(frame, name) if self._check else None
            items.append(
                DecodedItem(
                    name,
                    number,
                    square=square,
                    original=frame if keep_original else None,
                    decode_ms=decode_ms,
                    preprocess_ms=_ms_since(begin),
                    pixel_spacing_mm=spacing,
                    not_a_scan=not_a_scan,
                    region=region,
                    origin=(0, 0) if scan is None else scan.origin(index),
                    frame_shape=None if scan is None else scan.frame_shape,
                )
            )
        return items


_END = object()


def _read_images(scan: Scan, start: int, stop: int) -> tuple[list[np.ndarray | str], bool]:
    """Images ``start`` .. ``stop - 1`` of ``scan`` (fewer where it has fewer), each an array or,
    where it did not decode, the reason; and whether reading stopped there.

    A damaged image never costs the good ones of its batch: where the batch does not decode,
    its images are read one at a time. After a damaged one, the file's later images are still
    read where each decodes on its own (:attr:`Scan.frames_independent`: the frames of a
    compressed DICOM); elsewhere reading stops, and the reason says which images go unread.
    """
    stop = min(stop, scan.count)
    try:
        return scan.read(start, stop), False
    except Exception as exc:
        if stop - start <= 1 and scan.frames_independent:
            return [_reason(exc)], False
        if stop - start <= 1:
            return [_unread_after(scan, start, _reason(exc))], True
    images: list[np.ndarray | str] = []
    for index in range(start, stop):
        try:
            images += scan.read(index, index + 1)
        except Exception as exc:
            if scan.frames_independent:
                images.append(_reason(exc))
                continue
            images.append(_unread_after(scan, index, _reason(exc)))
            return images, True
    return images, False


def _unread_after(scan: Scan, index: int, reason: str) -> str:
    """``reason`` for image ``index``, naming the images after it that will not be read."""
    if index + 1 >= scan.count:
        return reason
    first, last = scan.where(index + 1)[0], scan.where(scan.count - 1)[0]
    later = f"frames {first}-{last} are" if last != first else f"frame {first} is"
    return f"{reason} ({later} not read)"


def _reason(exc: Exception) -> str:
    """An input's error text: the reason an :class:`InputError` gives, else a decoder bug's."""
    if isinstance(exc, InputError):
        return exc.reason
    return f"could not be decoded ({type(exc).__name__}: {exc})"


def _input_check(frame: np.ndarray, name: str) -> str | None:
    """:func:`~edge_runtime.io.scan_check.check_scan`'s reason; a bug in it costs no frame."""
    try:
        return check_scan(frame)
    except Exception as exc:
        log.warning(
            "%s: the input check failed (%s: %s); classified without it",
            display_path(name),
            type(exc).__name__,
            exc,
        )
        return None


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
