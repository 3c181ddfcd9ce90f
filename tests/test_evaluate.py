"""The evaluation command (ingest/evaluate.py) measures what it claims: a known-good pipeline scores high,
a deliberately broken one scores at chance, and the queries never enter the collection."""

import io
import json

import numpy as np
from PIL import Image

from bento.config import Settings
from ingest.evaluate import EDITS, evaluate_folder, judge, main, make_query

MILD = ["jpeg-q40", "crop-80", "thumb-256", "colour"]


class RandomVectors:
    """A broken pipeline: the real model's description, random unit vectors."""

    def __init__(self, real) -> None:
        self.real, self.rng = real, np.random.default_rng(0)

    def describe(self):
        return self.real.describe()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        vectors = self.rng.normal(size=(len(pixels), self.real.info.dim)).astype(np.float32)
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
