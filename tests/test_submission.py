"""submission.csv following a competition's sample file: its columns, its row order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vision_tl.core.errors import ConfigError
from vision_tl.inference.submission import submission_frame, submission_settings

pytestmark = pytest.mark.unit
CLASSES = ["cat", "dog", "fox"]
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])


def _template(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sample_submission.csv"
    path.write_text(text)
    return path


def test_label_template_keeps_its_columns_and_row_order(tmp_path: Path) -> None:
    template = _template(tmp_path, "ImageId,Species\n003,x\n001,x\n002,x\n")
    out = submission_frame(["001", "002", "003"], CLASSES, PROBS, CLASSES, template)
    assert list(out.columns) == ["ImageId", "Species"]
    assert out.ImageId.tolist() == ["003", "001", "002"], "the template's order, zeros kept"
    assert out.Species.tolist() == ["fox", "cat", "dog"]


def test_per_class_template_gets_probabilities(tmp_path: Path) -> None:
    template = _template(tmp_path, "id,dog,cat,fox\nb,0,0,0\na,0,0,0\nzz,0.5,0.5,0\n")
    out = submission_frame(["a", "b"], ["cat", "dog"], PROBS[:2], CLASSES, template)
    assert list(out.columns) == ["id", "dog", "cat", "fox"]
    assert out.id.tolist() == ["b", "a", "zz"]
    assert [float(v) for v in out.dog] == pytest.approx([0.8, 0.2, 0.5])
    assert out.iloc[2].tolist() == ["zz", "0.5", "0.5", "0"], "no prediction: left as it was"


def test_default_and_settings(tmp_path: Path) -> None:
    plain = submission_frame(["a", "b"], ["cat", "dog"], PROBS[:2], CLASSES)
    assert plain.to_dict("list") == {"id": ["a", "b"], "label": ["cat", "dog"]}
    assert submission_settings(True) == (True, None)
    assert submission_settings({"write": False, "template": None}) == (False, None)
    assert submission_settings({"write": False, "template": "s.csv"}) == (True, Path("s.csv"))


def test_bad_templates_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs an id column"):
        submission_frame(["a"], ["cat"], PROBS[:1], CLASSES, _template(tmp_path, "id\na\n"))
    with pytest.raises(ConfigError, match="none of its 1 ids"):
        submission_frame(["a"], ["cat"], PROBS[:1], CLASSES, _template(tmp_path, "id,l\nq,x\n"))
    with pytest.raises(ConfigError, match="one label column or columns named as the classes"):
        submission_frame(["a"], ["cat"], PROBS[:1], CLASSES, _template(tmp_path, "id,l,m\na,x,y\n"))
