"""Discovery of BUSI, BUS-BRA, class-folder and manifest layouts, and its errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data.datasets import DatasetError, Layout, detect_layout, discover_all, fingerprint


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8), value, np.uint8))
    return path


def _busi(root: Path) -> Path:
    for label, n in (("benign", 2), ("malignant", 1), ("normal", 1)):
        for i in range(1, n + 1):
            _png(root / label / f"{label} ({i}).png")
            _png(root / label / f"{label} ({i})_mask.png", 255)
    _png(root / "benign" / "benign (1)_mask_1.png", 255)
    return root


def _busbra(root: Path) -> Path:
    rows = ["ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX"]
    for ident, case, label in (
        ("bus_0001-l", 1, "malignant"),
        ("bus_0001-r", 1, "malignant"),
        ("bus_0002-l", 2, "benign"),
    ):
        _png(root / "Images" / f"{ident}.png")
        _png(root / "Masks" / f"mask_{ident[4:]}.png", 255)
        rows.append(f'{ident},{case},x,{label},4,GE Logiq 7,8,8,left,"[1,1,2,2]"')
    (root / "bus_data.csv").write_text("\n".join(rows) + "\n")
    return root


def test_busi_layout_pairs_masks_and_never_takes_them_as_images(tmp_path: Path) -> None:
    root = _busi(tmp_path / "Dataset_BUSI_with_GT")
    discovery = discover_all([root])
    assert detect_layout(root) is Layout.BUSI
    assert len(discovery.samples) == 4
    assert all("_mask" not in s.path.name and s.source == "busi" for s in discovery.samples)
    first = next(s for s in discovery.samples if s.path.name == "benign (1).png")
    assert [m.name for m in first.masks] == ["benign (1)_mask.png", "benign (1)_mask_1.png"]
    assert first.patient is None


def test_busi_is_named_by_its_folder_or_by_every_file_s_name_not_by_one(tmp_path: Path) -> None:
    """A clinic's folder with masks and one file named like a copy ("benign (1).png") was taken
    for BUSI: its scans counted as BUSI's, and its card said so."""
    busi = _busi(tmp_path / "renamed")  # BUSI's files under another folder name
    assert detect_layout(busi) is Layout.BUSI
    clinic = tmp_path / "clinic"
    for name in ("site1", "site2", "benign (1)"):
        _png(clinic / "benign" / f"{name}.png")
        _png(clinic / "benign" / f"{name}_mask.png", 255)
    assert detect_layout(clinic) is Layout.FOLDERS
    assert {s.source for s in discover_all([clinic]).samples} == {"clinic"}


def test_busbra_layout_reads_patients_labels_and_device(tmp_path: Path) -> None:
    samples = discover_all([_busbra(tmp_path / "bb")]).samples
    assert [s.label for s in samples] == ["malignant", "malignant", "benign"]
    assert [s.patient for s in samples] == ["busbra:1", "busbra:1", "busbra:2"]
    assert samples[0].attributes["device"] == "GE Logiq 7"
    assert samples[0].masks[0].name == "mask_0001-l.png"
    assert {s.source for s in samples} == {"busbra"}


def test_class_tree_uses_folder_name_as_source_and_summary_counts(tmp_path: Path) -> None:
    _png(tmp_path / "clinic" / "Benign" / "a.jpg")
    _png(tmp_path / "clinic" / "normal" / "b.png")
    discovery = discover_all([tmp_path / "clinic"])
    assert detect_layout(tmp_path / "clinic") is Layout.FOLDERS
    assert {(s.source, s.label) for s in discovery.samples} == {
        ("clinic", "benign"),
        ("clinic", "normal"),
    }
    table = discovery.summary()
    assert "clinic" in table and "total" in table


def test_manifest_csv_resolves_paths_relative_to_the_csv(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    table = tmp_path / "list.csv"
    table.write_text("path,label,group\nimg/a.png,malignant,p1\nimg/b.png,normal,\n")
    samples = discover_all([table]).samples
    assert [s.path for s in samples] == [tmp_path / "img" / "a.png", tmp_path / "img" / "b.png"]
    assert samples[0].patient.endswith(":p1") and samples[1].patient is None


def test_unknown_class_folder_suggests_the_closest_label(tmp_path: Path) -> None:
    _png(tmp_path / "d" / "malignent" / "a.png")
    with pytest.raises(DatasetError, match=r"unknown class 'malignent'.*Did you mean 'malignant'"):
        discover_all([tmp_path / "d"])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "absent", "data folder not found"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no class folders"),
        (lambda p: (p / "e" / "benign").mkdir(parents=True) or p / "e", "holds no images"),
    ],
)
def test_missing_or_empty_roots_are_refused_with_the_path(tmp_path: Path, make, match) -> None:
    root = make(tmp_path)
    with pytest.raises(DatasetError, match=match) as info:
        discover_all([root])
    assert str(info.value).startswith(str(root))


def test_manifest_missing_columns_and_missing_files_are_refused(tmp_path: Path) -> None:
    table = tmp_path / "m.csv"
    table.write_text("file,label\na.png,benign\n")
    with pytest.raises(DatasetError, match=r"missing column.*path"):
        discover_all([table])
    table.write_text("path,label\na.png,benign\n")
    with pytest.raises(DatasetError, match=r"not found.*relative to the CSV"):
        discover_all([table])


def test_busbra_with_missing_image_names_it(tmp_path: Path) -> None:
    root = _busbra(tmp_path / "bb")
    (root / "Images" / "bus_0002-l.png").unlink()
    with pytest.raises(DatasetError, match=r"bus_0002-l\.png"):
        discover_all([root])


def test_same_root_twice_is_refused(tmp_path: Path) -> None:
    root = _busi(tmp_path / "busi")
    with pytest.raises(DatasetError, match="listed under both"):
        discover_all([root, root])


def test_fingerprint_depends_on_content_not_location_or_order(tmp_path: Path) -> None:
    a = discover_all([_busi(tmp_path / "one" / "busi")]).samples
    b = discover_all([_busi(tmp_path / "two" / "busi")]).samples
    assert fingerprint(a) == fingerprint(tuple(reversed(b)))
    _png(b[0].path, 7)
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.realdata
def test_real_busi_and_busbra_counts(busi_root: Path, busbra_root: Path) -> None:
    discovery = discover_all([busi_root, busbra_root])
    counts: dict[tuple[str, str], int] = {}
    for s in discovery.samples:
        counts[s.source, s.label] = counts.get((s.source, s.label), 0) + 1
    assert counts == {
        ("busi", "benign"): 350,
        ("busi", "malignant"): 168,
        ("busi", "normal"): 106,
        ("busbra", "benign"): 1268,
        ("busbra", "malignant"): 607,
    }
    assert len({s.patient for s in discovery.samples if s.source == "busbra"}) == 1064


def test_a_class_folders_sub_folders_and_dicom_files_are_taken_and_the_rest_named(
    tmp_path: Path, caplog
) -> None:
    root = tmp_path / "clinic"
    _png(root / "benign" / "a.png")
    _png(root / "benign" / "patient7" / "b.png")
    (root / "normal").mkdir()
    (root / "normal" / "c.dcm").write_bytes(b"\0" * 128 + b"DICM")  # decoded when loaded
    (root / "normal" / "cine.gif").write_bytes(b"GIF89a")
    with caplog.at_level("INFO"):
        samples = discover_all([root]).samples
    assert [(s.path.relative_to(root).as_posix(), s.label) for s in samples] == [
        ("benign/a.png", "benign"),
        ("benign/patient7/b.png", "benign"),
        ("normal/c.dcm", "normal"),
    ]
    assert "cine.gif: not taken as a scan: GIF, a format edge-classify does not read" in caplog.text


def test_busi_masks_pair_with_their_image_in_a_sub_folder(tmp_path: Path) -> None:
    root = _busi(tmp_path / "Dataset_BUSI_with_GT")
    _png(root / "benign" / "more" / "benign (9).png")
    _png(root / "benign" / "more" / "benign (9)_mask.png", 255)
    (sample,) = [s for s in discover_all([root]).samples if s.path.name == "benign (9).png"]
    assert sample.masks == (root / "benign" / "more" / "benign (9)_mask.png",)


def test_a_utf16_manifest_is_named_and_told_to_be_utf8(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    table = tmp_path / "m.csv"
    table.write_bytes("path\tlabel\na.png\tbenign\n".encode("utf-16"))  # Excel's "Unicode text"
    with pytest.raises(DatasetError, match=r"is UTF-16 text .*must be UTF-8") as info:
        discover_all([table])
    assert str(info.value).startswith(f"{table}: ")


def test_manifest_errors_name_the_line(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    table = tmp_path / "m.csv"
    table.write_text("path,label\na.png,benign\n,benign\n")
    with pytest.raises(DatasetError, match=rf"^{table}, line 3: the path is empty"):
        discover_all([table])
    table.write_text("path,label\na.png,benign\n\nb.png,benign\n")  # a blank line counts
    with pytest.raises(DatasetError, match=r"not found \(e\.g\. line 4: b\.png\)"):
        discover_all([table])
    table.write_text("path,label\na.png,\n")
    with pytest.raises(DatasetError, match=r"line 2: no class given.* Fix the label on line 2\.$"):
        discover_all([table])
    table.write_text("path,label\na.png,benign\na.png,bening\n")
    with pytest.raises(DatasetError, match=r"line 3: unknown class 'bening'.*label on line 3\.$"):
        discover_all([table])


def test_a_class_folder_with_an_unknown_name_says_rename_the_folder(tmp_path: Path) -> None:
    _png(tmp_path / "d" / "cancer" / "a.png")
    with pytest.raises(DatasetError, match=r"unknown class 'cancer'.* Rename the folder\.$"):
        discover_all([tmp_path / "d"])


def test_manifest_header_names_are_read_in_any_case(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    table = tmp_path / "m.csv"
    table.write_text("Path,LABEL,Source,Device\na.png,Benign,clinic,Acme X1\n")
    (sample,) = discover_all([table]).samples
    assert (sample.label, sample.source, dict(sample.attributes)) == (
        "benign",
        "clinic",
        {"device": "Acme X1"},
    )


def test_a_scan_listed_twice_in_a_manifest_names_both_lines_and_labels(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    table = tmp_path / "m.csv"
    table.write_text("path,label\na.png,normal\nb.png,benign\na.png,normal\n")
    with pytest.raises(DatasetError, match=r"lines 2 and 4: a\.png listed twice") as info:
        discover_all([table])
    assert str(info.value).startswith(f"{table}, lines 2 and 4: ")
    assert "remove line 4" in str(info.value) and "pass each data set only once" not in str(
        info.value
    )
    table.write_text("path,label\na.png,normal\nb.png,benign\n./a.png,Benign\n")
    with pytest.raises(DatasetError) as info:
        discover_all([table])
    assert str(info.value) == (
        f"{table}, lines 2 and 4: a.png and ./a.png, one file, labelled normal on line 2 and "
        "benign on line 4; a scan has one label: remove the row with the wrong one"
    )


def test_a_mask_a_manifest_lists_must_exist_and_is_named_with_its_line(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "a_mask.png", 255)
    (tmp_path / "empty_mask.png").write_bytes(b"")  # unreadable: skipped with a warning later
    table = tmp_path / "m.csv"
    table.write_text(
        "path,label,masks\na.png,benign,a_mask.png; empty_mask.png\nb.png,benign,b_mask.png\n"
    )
    with pytest.raises(DatasetError) as info:
        discover_all([table])
    assert str(info.value).startswith(
        f"{table}: 1 listed mask(s) not found (e.g. line 3: b_mask.png); paths are relative"
    )
    table.write_text("path,label,masks\na.png,benign,a_mask.png; empty_mask.png\nb.png,benign,\n")
    first, second = discover_all([table]).samples
    assert first.masks == (tmp_path / "a_mask.png", tmp_path / "empty_mask.png")
    assert second.masks == ()


def test_a_semicolon_delimited_manifest_is_read_like_a_comma_delimited_one(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "a_mask.png", 255)
    _png(tmp_path / "a_mask_1.png", 255)
    table = tmp_path / "m.csv"
    table.write_text(  # Excel's "CSV" where a comma is the decimal separator
        'path;label;patient;masks;depth\na.png;benign;p1;"a_mask.png;a_mask_1.png";3,5\n'
    )
    (sample,) = discover_all([table]).samples
    assert (sample.path, sample.label, sample.patient, dict(sample.attributes)) == (
        tmp_path / "a.png",
        "benign",
        "p1",
        {"depth": "3,5"},
    )
    assert sample.masks == (tmp_path / "a_mask.png", tmp_path / "a_mask_1.png")
