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


def test_many_metrics_transpose_the_table():
    from dsunlearn.report import MAX_METRIC_COLUMNS

    n = MAX_METRIC_COLUMNS + 1
    r = {**_report(), "vanilla": {}, "methods": {"ga": {f"m{i}": i / n for i in range(n)}}}
    lines = report_table(r).splitlines()
    assert lines[0] == "| metric | ga |"  # the empty vanilla column is left out
    assert len(lines) == 2 + n and lines[3] == f"| m1 | {1 / n:.3f} |"
    r["vanilla"] = {"m0": 0.5}
    assert report_table(r).splitlines()[0] == "| metric | vanilla | ga |"
    assert report_table(r).splitlines()[3] == f"| m1 |  | {1 / n:.3f} |"


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


def _siu_report():
    r = _report()
    r["vanilla"].update(eff=0.1, gen=0.05, div=0.8, flu=1.7)
    r["methods"]["siu"] = {"forget_vqa_acc": 0.4, "eff": 0.9, "gen": 0.7, "div": 0.6, "flu": 3456.0}
    r["method_info"] = {
        "siu": {
            "images": [
                {"entity_id": "p3", "name": "Jorna Velst", "image_index": 0, "sha256": "ab12"},
            ],
            "new_names": {"p3": "Mira Tallen"},
        }
    }
    return r


def test_siu_metrics_and_images_in_report(tmp_path):
    path = write_report(tmp_path, _siu_report())
    assert json.loads(path.read_text()) == _siu_report()
    md = (tmp_path / "report.md").read_text()
    header = md.splitlines()[4]
    assert header.startswith("| model | forget_vqa_acc | retain_vqa_acc | eff | gen | div | flu |")
    assert "| siu | 0.400 |  | 0.900 | 0.700 | 0.600 | 3456.000 |" in md
    assert "## SIU images" in md
    assert "| method | entity_id | name | image_index | sha256 |" in md
    assert "| siu | p3 | Jorna Velst | 0 | ab12 |" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_images_section_without_method_info(tmp_path):
    write_report(tmp_path, _report())
    assert "SIU images" not in (tmp_path / "report.md").read_text()


def test_flu_gets_its_own_panel(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from dsunlearn import report as rep

    seen = {}
    real = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        seen["axes"] = axes
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    rep.plot_report(_siu_report(), tmp_path / "r.png")
    unit, wide = seen["axes"][0]
    assert [t.get_text() for t in wide.get_xticklabels()] == ["flu"]
    assert "flu" not in [t.get_text() for t in unit.get_xticklabels()]
    assert unit.get_ylim() == (0, 1.05)
    assert wide.get_yscale() == "log"


@pytest.mark.parametrize(
    "info",
    [["not", "a", "mapping"], {"siu": "text"}, {"siu": {"images": "x"}}, {"siu": {"images": [1]}}],
)
def test_validate_rejects_bad_method_info(info):
    r = _report()
    r["method_info"] = info
    with pytest.raises(ValueError, match="method_info"):
        validate_report(r)


def test_many_metrics_plot_one_line_per_metric(tmp_path):
    """Past MAX_METRIC_COLUMNS the figure grows in height (horizontal bars), not in width."""
    from PIL import Image

    from dsunlearn.report import MAX_METRIC_COLUMNS

    n = 3 * MAX_METRIC_COLUMNS
    metrics = {f"metric_{i}": i / n for i in range(n)}
    r = {**_report(), "vanilla": {}, "methods": {"ga": {**metrics, "flu": 3.0}}}
    write_report(tmp_path / "run", r)
    width, height = Image.open(tmp_path / "run" / "report.png").size
    assert height > 1.5 * width  # a 48-column strip would be ~7x wider than high
