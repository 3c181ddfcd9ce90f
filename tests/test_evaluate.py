"""The evaluation command (ingest/evaluate.py) measures what it claims: a known-good pipeline scores high,
a deliberately broken one scores at chance, and the queries never enter the collection."""

import io
import json

import numpy as np
from PIL import Image

from bento.core.config import Settings
from ingest.evaluate import EDITS, evaluate_folder, judge, main, make_query

MILD = ["jpeg-q40", "crop-80", "thumb-256", "colour"]


class RandomVectors:
    """A broken pipeline: the real models' descriptions, random unit vectors (for ``broken`` roles only)."""

    def __init__(self, real, broken=("similarity", "copy")) -> None:
        self.real, self.broken, self.rng = real, broken, np.random.default_rng(0)

    def describe(self):
        return self.real.describe()

    def describe_copy(self):
        return self.real.describe_copy()

    def embed(self, pixels: np.ndarray, role: str = "similarity") -> np.ndarray:
        if role not in self.broken:
            return self.real.embed(pixels, role)
        model = self.describe() if role == "similarity" else self.describe_copy()
        vectors = self.rng.normal(size=(len(pixels), model.info.dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_queries_are_deterministic_and_differ_by_edit():
    image = Image.effect_noise((300, 200), 50).convert("RGB")
    assert make_query(image, "crop-60", seed=1, index=3) == make_query(image, "crop-60", seed=1, index=3)
    assert make_query(image, "crop-60", seed=1, index=3) != make_query(image, "crop-60", seed=2, index=3)
    queries = {name: make_query(image, name, 0, 0) for name in EDITS}
    assert len(set(queries.values())) == len(EDITS)
    assert max(Image.open(io.BytesIO(queries["thumb-64"])).size) == 64


def test_judge_ranks_the_original_and_the_best_false_match():
    hits = [("b", 0.9), ("a", 0.8), ("c", 0.5)]
    outcome = judge(hits, "a")
    assert (outcome.rank, outcome.true_score, outcome.false_score) == (2, 0.8, 0.9)
    assert judge(hits, "z").rank is None and judge([("a", 1.0)], "a").false_score is None
    assert outcome.same_photo is False and judge(hits, "b").same_photo is True
    # A stored sibling (another crop of the same photo) first: the same photo, and no false match.
    sibling_first = judge([("s", 0.95), ("a", 0.9), ("c", 0.4)], "a", frozenset({"s"}))
    assert (sibling_first.same_photo, sibling_first.rank, sibling_first.false_scores) == (True, 2, [0.4])


def test_a_good_pipeline_scores_high_and_a_broken_one_at_chance(efficientnet, photo_set, tmp_path):
    settings = Settings(data_dir=tmp_path / "unused")
    good = evaluate_folder(photo_set["root"], transforms=MILD, settings=settings, embedding=efficientnet)
    assert good.originals == sum(1 for p in photo_set["root"].rglob("*") if p.is_file())
    assert good.overall.queries == good.originals * len(MILD)
    assert good.overall.recall_at_1 >= 0.9 and good.overall.map >= 0.9, good.table()
    jpeg = next(row for row in good.per_transform if row.transform == "jpeg-q40")
    assert jpeg.recall_at_1 >= 0.95 and jpeg.true_scores.p50 > good.overall.false_scores.p50
    broken = evaluate_folder(photo_set["root"], transforms=MILD, settings=settings, embedding=RandomVectors(efficientnet))
    assert broken.overall.recall_at_1 <= 0.25, broken.table()
    assert not (tmp_path / "unused").exists(), "the evaluation works in a temporary collection of its own"


def test_the_copy_question_ranks_a_good_copy_model_above_a_broken_one(both_models, photo_set, tmp_path):
    """--mode copies: the copy model's whole ranking (what its thresholds come from); a broken copy model
    (random vectors) is found out while the similarity model stays the real one."""
    settings = Settings(data_dir=tmp_path / "unused")
    hard = ["crop-60", "thumb-64", "flip", "caption"]
    good = evaluate_folder(photo_set["root"], transforms=hard, settings=settings, embedding=both_models, mode="copies")
    assert good.mode == "copies" and good.model.startswith("sscd-distilled@"), good.model
    assert good.overall.recall_at_1 >= 0.9 and good.thresholds.near_duplicate is not None, good.table()
    broken = evaluate_folder(
        photo_set["root"], transforms=hard, settings=settings, embedding=RandomVectors(both_models, ("copy",)), mode="copies"
    )
    assert broken.overall.recall_at_1 <= 0.25, broken.table()
    both = evaluate_folder(photo_set["root"], transforms=hard, settings=settings, embedding=both_models)
    assert both.mode == "both" and " + efficientnet-lite0@" in both.model
    assert both.overall.recall_at_1 >= good.overall.recall_at_1 - 0.05, both.table()


def test_siblings_are_stored_beside_the_originals(efficientnet, photo_set, tmp_path):
    settings = Settings(data_dir=tmp_path / "unused")
    report = evaluate_folder(photo_set["root"], limit=6, transforms=["crop-40"], with_siblings=True, settings=settings, embedding=efficientnet)
    assert report.originals == 6 and report.siblings == 12 and report.overall.queries == 6
    assert "hard negatives" in report.table()


def test_the_command_line(efficientnet, photo_set, capsys, monkeypatch):
    monkeypatch.setenv("RIS_MODEL_NAME", "efficientnet-lite0")
    assert main([str(photo_set["root"]), "--limit", "4", "--transforms", "jpeg-q40,flip", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["originals"] == 4 and [row["transform"] for row in report["per_transform"]] == ["jpeg-q40", "flip"]
    assert main([str(photo_set["root"]), "--transforms", "sepia"]) == 2
    assert main([str(photo_set["root"] / "nope")]) == 2
