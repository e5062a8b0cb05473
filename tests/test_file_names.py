"""File names and text files that are not UTF-8: a Linux file name may be any bytes (Python
keeps the others as lone surrogates), while blda's outputs (HDF5 strings, JSON, HTML, TOML) hold
UTF-8 text; and a binary file given where a text file is expected. Paths are recorded with
each such byte as the text \\xNN, a TOML config refuses them, and a text input that is not
UTF-8 is one line naming it, never a UnicodeError traceback."""

from __future__ import annotations

import os

import h5py
import pytest
import tomllib
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from output_helpers import expect_one_line_error
from test_calibration_job import GRID, _write_store
from test_dump import WHOLE, dump, install_plugin, make_cityscapes

from blda_cli.main import _register_commands, cli
from blda_tools.errors import BLDAError
from blda_tools.fileio import as_text, read_text_file
from blda_tools.store import LogitStore
from blda_tools.training.config import _toml_value, load_config

_register_commands()
NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 'cafe' with an acute e, as an old archive has it
UTF8_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))  # no lone surrogates


def test_bytes_that_are_not_utf8_become_backslash_escapes():
    assert as_text(NOT_UTF8) == "caf\\xe9"
    assert as_text(os.fsdecode(b"a\xff/b\xc3\xa9")) == "a\\xff/b\u00e9"  # valid UTF-8 kept
    assert as_text("\ud800") == "\\ud800"  # a surrogate standing for no byte


@given(st.binary())
def test_any_file_name_becomes_utf8_text(raw):
    text = as_text(os.fsdecode(raw))
    assert text.encode("utf-8").decode("utf-8", "backslashreplace") == text
    assert text == raw.decode("utf-8", "backslashreplace")  # Python's own decoding of the bytes


@given(UTF8_TEXT)
def test_utf8_text_is_unchanged(text):
    assert as_text(text) == text


@given(UTF8_TEXT)
def test_config_strings_round_trip_through_toml(text):
    assert tomllib.loads(f"key = {_toml_value(text)}")["key"] == text


def test_a_config_path_that_is_not_utf8_is_refused():
    with pytest.raises(BLDAError) as refused:
        load_config("synthcity_tiny", [f'data.root="/data/{NOT_UTF8}"'])
    assert str(refused.value) == (
        "--set: data.root: /data/caf\\xe9 is not UTF-8 text; a config (TOML) holds UTF-8 only: "
        "rename the folder, or link it under a UTF-8 name"
    )


def test_text_inputs_that_are_not_utf8_are_one_line(tmp_path):
    binary = b"\x80PK\x03\x04 not text"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_bytes(binary)
    (tmp_path / "config.toml").write_bytes(binary)
    with pytest.raises(BLDAError) as refused:
        read_text_file(tmp_path / "config.toml", "a TOML config")
    assert str(refused.value) == (
        f"{tmp_path / 'config.toml'}: not UTF-8 text (byte 0x80 at offset 0); expected a TOML config"
    )
    result = CliRunner().invoke(cli, ["plot-log", str(tmp_path / "run")])
    expect_one_line_error(result, "log.jsonl: not UTF-8 text", "expected a training log")
    arguments = [
        "train",
        "--config",
        str(tmp_path / "config.toml"),
        "--work-dir",
        str(tmp_path / "w"),
    ]
    expect_one_line_error(CliRunner().invoke(cli, arguments), "expected a TOML config")


def test_diagnose_records_a_store_path_that_is_not_utf8(tmp_path):
    folder = tmp_path / NOT_UTF8
    folder.mkdir()
    store = _write_store(folder / "eval.h5", 1)
    result = CliRunner().invoke(
        cli, ["diagnose", str(store), "--out", str(folder / "d"), "--grid", GRID]
    )
    assert result.exit_code == 0, result.output
    with h5py.File(folder / "d" / "statistics.h5", "r") as file:
        assert list(file.attrs["stores"]) == [f"{tmp_path}/caf\\xe9/eval.h5"]
    assert f"{tmp_path}/caf\\xe9/eval.h5" in (folder / "d" / "report.html").read_text("utf-8")


def test_an_image_name_that_is_not_utf8_is_stored_as_text(tmp_path, monkeypatch):
    plugin = install_plugin(tmp_path, monkeypatch)
    images = make_cityscapes(tmp_path / "data", count=2)
    labels = tmp_path / "data" / "gtFine" / "val"
    for image in images:  # both files of an image renamed alike, so the pair still matches
        stem = image.name.removesuffix("_leftImg8bit.png")
        label = labels / image.parent.name / f"{stem}_gtFine_labelIds.png"
        renamed = stem.replace("_000000_", f"_{NOT_UTF8}_", 1)  # aachen_caf\xe9_000000
        image.rename(image.with_name(f"{renamed}_leftImg8bit.png"))
        label.rename(label.with_name(f"{renamed}_gtFine_labelIds.png"))
    out = tmp_path / "o.h5"
    dump(plugin, tmp_path / "data", out, inference=WHOLE, workers=0, dtype="float32")
    with LogitStore(out) as store:
        names = [image.name for image in store.images]
    assert names == [
        "leftImg8bit/val/aachen/aachen_caf\\xe9_000000_leftImg8bit",
        "leftImg8bit/val/bochum/bochum_caf\\xe9_000001_leftImg8bit",
    ]
