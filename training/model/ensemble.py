"""Several trained classifiers, and optionally their mirrored views, as one classifier of the
model contract: one graph, so that every consumer (export, INT8, the runtime) runs all of it.

- ``probabilities``: the mean of every member's probabilities on the scan (and on the scan
  mirrored left to right, with ``mirror``: each member runs both views as one batch of two,
  which INT8 runs faster than two passes). Calibration is refitted on the result.
- ``lesion`` and ``cam``: each member's maps (mirrored views mirrored back) resized to the
  ensemble's grids and averaged: ``S / 4`` for the lesion, the first member's class-map grid
  scaled to ``S`` for ``cam``. ``lesion_from`` may name the members whose lesion maps are
  averaged (by default all): the lesion map draws the outline and decides "normal".
- ``features``: the members' pooled features (mean of the two views) side by side, ``[N, sum D]``,
  so that the unfamiliar-scan distances see every member.

A member whose input side differs from the ensemble's gets the ensemble's uint8 input resized to
its side (bilinear, rounded back to uint8) inside the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from edge_runtime.model.contract import CAM, FEATURES, INPUT_NAME, LESION, PROBABILITIES
from training.model.classifier import has_lesion_output
from training.model.layers import MeanOfViews, ResizeSquare, WithMirror

LESION_STRIDE = 4


def combine(
    members: Sequence[keras.Model],
    input_size: int,
    *,
    mirror: bool,
    lesion_from: Sequence[int] | None = None,
) -> keras.Model:
    """One classifier averaging ``members`` (each a model of the contract).

    Args:
        members: trained classifiers with the same classes; one member with ``mirror`` gives
            flip test-time augmentation alone.
        input_size: side ``S`` of the ensemble's square uint8 input ``[N, S, S, 1]``.
        mirror: also run each member on the scan mirrored left to right.
        lesion_from: positions in ``members`` of those whose lesion maps make the ``lesion``
            output; None: every member.

    Returns:
        A model with the contract's outputs (``lesion`` only when every member has one).

    Raises:
        ValueError: no member, members with different class counts, an input side that is
            not a multiple of the lesion stride (4), or ``lesion_from`` naming no member or one
            that is not there.
    """
    if not members:
        raise ValueError("An ensemble needs at least one member model.")
    classes = {int(m.get_layer(PROBABILITIES).output.shape[-1]) for m in members}
    if len(classes) != 1:
        raise ValueError(f"The member models have different class counts: {sorted(classes)}.")
    if input_size % LESION_STRIDE:
        raise ValueError(f"The ensemble's input side must be a multiple of 4. Got {input_size}.")
    first = members[0]
    cam_side = round(first.get_layer(CAM).output.shape[1] * input_size / first.inputs[0].shape[1])
    sides = {CAM: cam_side, LESION: input_size // LESION_STRIDE}
    lesion = all(has_lesion_output(m) for m in members)
    lesion_members = set(range(len(members)) if lesion_from is None else lesion_from)
    if not lesion_members or not lesion_members <= set(range(len(members))):
        raise ValueError(
            f"lesion_from must name members 0..{len(members) - 1}. Got {list(lesion_from or [])}."
        )
    image = keras.Input((input_size, input_size, 1), dtype="uint8", name=INPUT_NAME)
    # with mirror, each member runs the scan and its mirror as one batch of two
    views = WithMirror(name="with_mirror")(image) if mirror else image
    collected: dict[str, list] = {PROBABILITIES: [], CAM: [], LESION: []}
    features = []
    for i, member in enumerate(members):
        maps = (CAM, LESION) if lesion and i in lesion_members else (CAM,)
        names = [PROBABILITIES, FEATURES, *maps]
        wrapped = keras.Model(
            member.inputs, {n: member.get_layer(n).output for n in names}, name=f"member{i}"
        )
        side = int(member.inputs[0].shape[1])
        view = views
        if side != input_size:
            view = ResizeSquare(side, as_uint8=True, name=f"m{i}_input")(view)
        out = wrapped(view)
        for name in (PROBABILITIES, FEATURES, *maps):
            grid = out[name]
            if name in maps and int(grid.shape[1]) != sides[name]:
                grid = ResizeSquare(sides[name], name=f"m{i}_{name}")(grid)
            if mirror:
                grid = MeanOfViews(mirror_back=name in maps, name=f"m{i}_{name}_views")(grid)
            (features if name == FEATURES else collected[name]).append(grid)
    outputs = {
        PROBABILITIES: _mean(collected[PROBABILITIES], PROBABILITIES),
        CAM: _mean(collected[CAM], CAM),
        FEATURES: layers.Concatenate(name=FEATURES, dtype="float32")(features)
        if len(features) > 1
        else layers.Identity(name=FEATURES, dtype="float32")(features[0]),
    }
    if lesion:
        outputs[LESION] = _mean(collected[LESION], LESION)
    return keras.Model(image, outputs, name="edge_ensemble")


def _mean(tensors: list, name: str):
    if len(tensors) == 1:
        return layers.Identity(name=name, dtype="float32")(tensors[0])
    return layers.Average(name=name, dtype="float32")(tensors)
