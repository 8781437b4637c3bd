"""Expanding PATH arguments: files, folders, glob patterns, problems and duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.io.sources import expand_sources, is_scan_file

DICOM_HEAD = b"\x00" * 128 + b"DICM" + b"\x00" * 16


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "scans"
    for name in ["b.png", "a.JPG", "sub/c.dcm", "sub/deeper/d.tiff", "z/e.bmp"]:
        touch(root / name)
    touch(root / "IM_0001", DICOM_HEAD)
    touch(root / "1.2.840.113619.2.55", DICOM_HEAD)  # UID-named DICOM file
    touch(root / "README", b"not dicom")
    touch(root / "notes.txt")
    touch(root / ".hidden.png")
    touch(root / ".cache/f.png")
    touch(root / "DICOMDIR", DICOM_HEAD)
    return root


def names(files: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in files]


def test_folder_is_walked_recursively_in_sorted_order(tree: Path) -> None:
    files, problems = expand_sources([str(tree)])
    assert problems == []
    assert names(files, tree) == [
        "1.2.840.113619.2.55",
        "IM_0001",
        "a.JPG",
        "b.png",
        "sub/c.dcm",
        "sub/deeper/d.tiff",
        "z/e.bmp",
    ]


def test_file_with_odd_extension_is_taken_as_given(tree: Path) -> None:
    files, problems = expand_sources([str(tree / "notes.txt")])
    assert files == [tree / "notes.txt"] and problems == []


def test_glob_pattern_expands_sorted(tree: Path) -> None:
    files, problems = expand_sources([str(tree / "**" / "*.d*")])
    assert problems == []
    assert names(files, tree) == ["sub/c.dcm"]
    files, _ = expand_sources([str(tree / "*.png")])
    assert names(files, tree) == ["b.png"]


def test_glob_that_matches_folders_walks_them(tree: Path) -> None:
    files, problems = expand_sources([str(tree / "s*")])
    assert problems == []
    assert names(files, tree) == ["sub/c.dcm", "sub/deeper/d.tiff"]


def test_glob_matching_only_non_images_is_a_problem(tree: Path) -> None:
    item = str(tree / "*.txt")
    assert expand_sources([item]) == ([], [(item, "pattern matched 1 path but no images")])


def test_missing_path_is_a_problem(tmp_path: Path) -> None:
    item = str(tmp_path / "nowhere.png")
    assert expand_sources([item]) == ([], [(item, "no such file or folder")])


def test_pattern_matching_nothing_is_a_problem(tmp_path: Path) -> None:
    item = str(tmp_path / "*.png")
    assert expand_sources([item]) == ([], [(item, "pattern matched no files")])


def test_empty_folder_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "text" / "notes.txt")
    items = [str(tmp_path / "empty"), str(tmp_path / "text")]
    files, problems = expand_sources(items)
    assert files == []
    assert problems == [(item, "folder contains no images") for item in items]


def test_duplicates_are_removed_keeping_first_order(tree: Path) -> None:
    b = str(tree / "b.png")
    files, problems = expand_sources([b, str(tree), str(tree / "*.png"), b])
    assert problems == []
    assert files[0] == tree / "b.png"
    assert len(files) == len(set(files)) == 7


def test_relative_and_absolute_spellings_are_one_file(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree)
    files, _ = expand_sources(["b.png", "./b.png", str(tree / "b.png")])
    assert files == [Path("b.png")]


def test_dangling_symlink_given_explicitly_is_returned(tmp_path: Path) -> None:
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "gone.png")
    assert expand_sources([str(link)]) == ([link], [])


def test_problems_do_not_stop_the_other_items(tree: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    files, problems = expand_sources([missing, str(tree / "b.png")])
    assert files == [tree / "b.png"]
    assert problems == [(missing, "no such file or folder")]


def test_is_scan_file_checks_suffix_and_content(tree: Path) -> None:
    assert is_scan_file(tree / "a.JPG")
    assert is_scan_file(tree / "IM_0001")
    assert not is_scan_file(tree / "README")
    assert not is_scan_file(tree / "notes.txt")
    assert not is_scan_file(tree / "DICOMDIR")


def test_a_file_reached_through_links_and_globs_is_taken_once(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    touch(root / "a.png")
    (root / "same.png").symlink_to(root / "a.png")
    (root / "again").symlink_to(root)  # a cycle
    touch(tmp_path / "elsewhere" / "b.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a folder reached by a link
    files, problems = expand_sources([str(root), str(root / "*.png"), str(root / "linked")])
    assert problems == []
    assert names(files, root) == ["a.png", "linked/b.png"]


def test_content_decides_for_names_that_say_nothing(tmp_path: Path) -> None:
    png = touch(tmp_path / "export_0001", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    raw = touch(tmp_path / "US.1.2.3.99", DICOM_HEAD)
    bare = touch(tmp_path / "OLD0001", b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\x00" * 64)
    text = touch(tmp_path / "notes.v2", b"BM but only text")
    assert is_scan_file(png) and is_scan_file(raw) and is_scan_file(bare)
    assert not is_scan_file(text)


def test_links_that_lead_nowhere_in_a_folder_are_taken_so_their_records_say_so(
    tmp_path: Path,
) -> None:
    """A dangling link without a suffix and a link loop were left out without a word."""
    folder = tmp_path / "export"
    touch(folder / "a.png")
    (folder / "IMGDANGLE").symlink_to(tmp_path / "gone")
    (folder / "loopa").symlink_to(folder / "loopb")
    (folder / "loopb").symlink_to(folder / "loopa")
    files, problems = expand_sources([str(folder)])
    assert names(files, folder) == ["IMGDANGLE", "a.png", "loopa", "loopb"] and problems == []
