"""One OOD evaluation: `evaluate(score, sets)` computes the score's features on every image set, fits the
score on the in-distribution training images ("stats", never scored) and scores the in-distribution and
OOD test sets. The `OODRun` it returns holds everything the reports (JSON, CSV, plots) read."""

import time
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch

from .scores import CompositeScore, Score
from .scoring import ood_metrics


@dataclass
class OODRun:
    score: Score  # the fitted score (its settings, parts and levels)
    columns: List[str]  # names of the per-image statistics
    features: Dict[str, np.ndarray]  # set -> (N, len(columns)) per-image statistics
    scores: Dict[str, np.ndarray]  # "in" / "out" -> (N,) final scores (higher = more anomalous)
    metrics: dict  # of the final score, OOD positive
    per_score: Dict[str, dict] = field(default_factory=dict)  # a composite's parts, and itself
    part_scores: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)  # part -> set -> scores
    timings: dict = field(default_factory=dict)

    @property
    def settings(self):
        return self.score.settings

    @property
    def nfe_per_image(self) -> int:
        return self.score.nfe_per_image

    def counts(self) -> dict:
        n = {name: len(self.features.get(name, ())) for name in ("in", "out", "stats")}
        return {**n, "scored": sum(n.values())}


def compute_features(score: Score, sets: Dict[str, torch.Tensor]) -> tuple:
    """({set: features}, seconds spent) for the sets given ("stats" first, when present)."""
    start, features = time.perf_counter(), {}
    for name in sorted(sets, key=lambda s: s != "stats"):
        features[name] = score.features(sets[name], name)
    return features, time.perf_counter() - start


def evaluate(score: Score, sets: Dict[str, torch.Tensor]) -> OODRun:
    """`sets`: uint8 images "in" and "out" (test splits) and, when the score fits anything, "stats"."""
    features, seconds = compute_features(score, sets)
    fit_start = time.perf_counter()
    if score.needs_training_images:
        score.fit(features["stats"])
    fit_s = time.perf_counter() - fit_start
    final = {name: score.score(features[name]) for name in ("in", "out")}
    run = OODRun(score, score.columns, features, final, ood_metrics(final["in"], final["out"]))
    if isinstance(score, CompositeScore):
        parts = {name: score.part_scores(features[name]) for name in ("in", "out")}
        run.part_scores = {p: {name: parts[name][p] for name in parts} for p in parts["in"]}
        run.per_score = {p: ood_metrics(v["in"], v["out"]) for p, v in run.part_scores.items()}
        run.per_score[score.name] = run.metrics
    scored = sum(len(v) for v in sets.values())
    run.timings = {"score_s": seconds, "fit_s": fit_s, "images_per_s": scored / max(seconds, 1e-9)}
    return run
