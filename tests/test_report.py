"""Report writing: shape check, markdown table, PNG, atomic replacement."""

import json

import pytest

from dsunlearn.report import report_table, validate_report, write_report


def _report():
    return {
        "vanilla": {"forget_vqa_acc": 0.95, "retain_vqa_acc": 0.9},
        "methods": {"ga": {"forget_vqa_acc": 0.2, "retain_vqa_acc": 0.5}},
        "chance": 0.25,
        "world_size": 2,
        "elapsed_s": 12.5,
    }


def test_write_report(tmp_path):
    path = write_report(tmp_path / "run", _report())
    data = json.loads(path.read_text())
    assert data == _report()
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| ga | 0.200 | 0.500 |" in md
    png = (tmp_path / "run" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_table_rows_in_order():
    lines = report_table(_report()).splitlines()
    assert lines[0] == "| model | forget_vqa_acc | retain_vqa_acc |"
    assert lines[2].startswith("| vanilla |") and lines[3].startswith("| ga |")


@pytest.mark.parametrize("drop", ["vanilla", "methods", "chance", "world_size", "elapsed_s"])
def test_validate_rejects_missing_keys(drop):
    r = _report()
    del r[drop]
    with pytest.raises(ValueError, match=drop):
        validate_report(r)


def test_invalid_report_leaves_old_one(tmp_path):
    write_report(tmp_path, _report())
    bad = _report()
    bad["methods"]["ga"]["forget_vqa_acc"] = "oops"
    with pytest.raises(ValueError):
        write_report(tmp_path, bad)
    assert json.loads((tmp_path / "report.json").read_text()) == _report()
