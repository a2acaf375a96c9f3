"""The per-category accuracy chart, drawn from real ``report_dict`` output (matplotlib, Agg)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from img_guidance.eval.plots import category_accuracy_chart
from img_guidance.eval.shapes import report_dict
from img_guidance.shapes.judge import Report


def _report(correct: dict[str, list[bool | None]]) -> dict:
    """report_dict of verdicts with the given ``correct`` per category (only the fields Report reads)."""
    verdicts = [
        SimpleNamespace(category=name, correct=value, score=float(bool(value)))
        for name, values in correct.items()
        for value in values
    ]
    return report_dict(Report(verdicts))


@pytest.fixture
def systems() -> dict[str, dict]:
    return {
        "base": _report(
            {"single_object": [True] * 8 + [False] * 2, "counting": [True, False, None, False] * 3}
        ),
        "IMG": _report({"single_object": [True] * 10, "counting": [True, True, None, False] * 3}),
        "another seed": _report(
            {"single_object": [True] * 7 + [False] * 3, "counting": [True, False, False, False] * 3}
        ),
    }


def test_writes_a_png(tmp_path, systems):
    out = category_accuracy_chart(systems, tmp_path / "charts" / "accuracy.png", title="ShapesWorld")
    assert out == tmp_path / "charts" / "accuracy.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 600 <= width <= 4000 and 400 <= height <= 2000
    assert [p.name for p in out.parent.iterdir()] == ["accuracy.png"]  # no temporary file left behind


def test_overwrites_atomically(tmp_path, systems):
    path = tmp_path / "accuracy.png"
    path.write_bytes(b"old")
    category_accuracy_chart(systems, str(path), title="again")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["accuracy.png"]


def test_missing_category_names_system_and_category(tmp_path, systems):
    systems["IMG"] = _report({"single_object": [True] * 10})
    with pytest.raises(ValueError, match="system 'IMG', category 'counting'"):
        category_accuracy_chart(systems, tmp_path / "accuracy.png", title="ShapesWorld")
    assert not any(tmp_path.iterdir())


def test_bad_interval_is_named(tmp_path, systems):
    systems["base"]["overall"]["ci95"] = [0.9, 0.1]
    with pytest.raises(ValueError, match=r"system 'base', category 'overall': ci95 .*\[0\.9, 0\.1\]"):
        category_accuracy_chart(systems, tmp_path / "accuracy.png", title="ShapesWorld")


def test_no_systems(tmp_path):
    with pytest.raises(ValueError, match="got none"):
        category_accuracy_chart({}, tmp_path / "accuracy.png", title="empty")


def test_not_a_png_path(tmp_path, systems):
    with pytest.raises(ValueError, match=r"accuracy\.svg"):
        category_accuracy_chart(systems, tmp_path / "accuracy.svg", title="ShapesWorld")


def test_import_is_light():
    """Importing the eval package and its modules pulls in neither matplotlib nor torch."""
    code = (
        "import sys, img_guidance.eval, img_guidance.eval.plots, img_guidance.eval.stats; "
        "print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
