"""captions.yaml: YAML 1.2, keys are the text written in the file, duplicates and syntax errors name file and line."""

from __future__ import annotations

import pytest

from chibisplat.dataset.captions import CaptionBook, CaptionError, read_captions_table


def _book(tmp_path, text: str) -> CaptionBook:
    (tmp_path / "captions.yaml").write_text(text, encoding="utf-8")
    return CaptionBook(tmp_path)


def test_keys_stay_the_text_written(tmp_path):
    # YAML 1.1 (PyYAML) reads these keys as 1, 8, True, 10 and None: 001 and 01 would collide, `on` would be True.
    book = _book(tmp_path, "001: first\n010: tenth\non: switch\n'0x1A': hex\ntrue: yes-man\n01: one\n")
    assert book.table == {"001": "first", "010": "tenth", "on": "switch", "0x1A": "hex", "true": "yes-man",
                          "01": "one"}
    assert book.caption_for("001", "001.fbx").text == "first"
    assert book.caption_for("010", "010.glb").text == "tenth"
    assert book.caption_for("on", "on.fbx").text == "switch"
    assert book.caption_for("true", "True.fbx").text == "yes-man"


def test_values_are_text_as_written(tmp_path):
    # A caption that YAML would resolve to a number or a boolean is kept as written.
    assert _book(tmp_path, "a: 1.50\nb: no\nc: '  two   words '\n").table == {"a": "1.50", "b": "no", "c": "two words"}


def test_duplicate_key_names_file_and_both_lines(tmp_path):
    with pytest.raises(CaptionError) as e:
        _book(tmp_path, "# captions\nprincess: a princess\nwitch: a witch\nprincess: another princess\n")
    msg = str(e.value)
    assert str(tmp_path / "captions.yaml") in msg
    assert "line 4" in msg and "duplicate key 'princess'" in msg and "first on line 2" in msg


def test_keys_that_1_1_would_merge_are_distinct_not_duplicates(tmp_path):
    # 010 (octal 8 in YAML 1.1) and 8; 1 and 001: distinct strings, both kept.
    assert _book(tmp_path, "010: a\n8: b\n1: c\n001: d\n").table == {"010": "a", "8": "b", "1": "c", "001": "d"}


def test_syntax_error_names_file_and_line(tmp_path):
    with pytest.raises(CaptionError) as e:
        _book(tmp_path, "princess: a princess\nwitch: a witch: with a hat\n")
    msg = str(e.value)
    assert str(tmp_path / "captions.yaml") in msg and "line 2" in msg and "syntax error" in msg


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("a: ok\nb:\n", 2, "non-empty"),
        ("a: ok\nb: ~\n", 2, "non-empty"),
        ("a: ok\n\nb: [x, y]\n", 3, "non-empty text"),
        ("- a\n- b\n", 1, "expected a mapping"),
    ],
)
def test_bad_values_name_the_line(tmp_path, text, line, what):
    with pytest.raises(CaptionError, match=rf"captions\.yaml, line {line}: .*{what}"):
        _book(tmp_path, text)


def test_empty_file_is_an_empty_table(tmp_path):
    (tmp_path / "captions.yaml").write_text("# nothing yet\n")
    assert read_captions_table(tmp_path / "captions.yaml") == {}
