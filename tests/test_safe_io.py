"""Untrusted files and JSON: every malformed or hostile input is an UnsafeInput, never a hang or a crash."""
import json
import os

import pytest

from nnunet_adpfl.common.safe_io import UnsafeInput, check_inside, loads_json, read_file, read_json_file


@pytest.mark.parametrize("text", ["NaN", '{"a": NaN}', '{"a": 1e999}', '{"a": -Infinity}', "[" * 5000 + "]" * 5000,
                                  '{"a": 1, "a": 2}', "{", "\xff", "1" * 100])
def test_hostile_json_is_refused(text):
    with pytest.raises(UnsafeInput):
        loads_json(text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff")


def test_plain_json_parses_and_strings_with_brackets_do_not_count_as_depth():
    assert loads_json(json.dumps({"a": ["[[[[" * 50], "b": 1.5})) == {"a": ["[[[[" * 50], "b": 1.5}


def test_size_limit():
    with pytest.raises(UnsafeInput, match="exceeds"):
        loads_json(b"[" + b"1," * 100 + b"1]", max_bytes=50)


def test_read_file_refuses_symlinks_dirs_fifos_and_oversize(tmp_path):
    (tmp_path / "ok").write_bytes(b"12345")
    assert read_file(tmp_path / "ok", 5, tmp_path) == b"12345"
    with pytest.raises(UnsafeInput, match="limit"):
        read_file(tmp_path / "ok", 4)
    os.symlink(tmp_path / "ok", tmp_path / "link")
    with pytest.raises(UnsafeInput):
        read_file(tmp_path / "link", 10)
    (tmp_path / "d").mkdir()
    with pytest.raises(UnsafeInput):
        read_file(tmp_path / "d", 10)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafeInput, match="regular"):
        read_file(tmp_path / "fifo", 10)  # returns at once: opened non-blocking
    os.symlink("/dev/zero", tmp_path / "zero")
    with pytest.raises(UnsafeInput):
        read_file(tmp_path / "zero", 10)
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "missing", 10)


def test_symlinked_parent_folder_is_not_followed(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f.json").write_text("{}")
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "round_0001")
    with pytest.raises(UnsafeInput, match="symlink"):
        read_json_file(tmp_path / "root" / "round_0001" / "f.json", root=tmp_path / "root")
    with pytest.raises(UnsafeInput, match="symlink"):
        check_inside(tmp_path / "root", tmp_path / "root" / "round_0001" / "new.json")
    with pytest.raises(UnsafeInput, match="outside"):
        check_inside(tmp_path / "root", tmp_path / "root" / ".." / "x")
    check_inside(tmp_path / "root", tmp_path / "root" / "round_0002" / "new.json")
