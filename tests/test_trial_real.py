"""run_trial on the real offline class-extension pair (backbones `mnist_old` -> `mnist_new`).

mnist_old (128-d) saw digits 0-4, mnist_new (256-d) all ten, trained here from
different seeds and architectures: the two spaces are unrelated, so without
adapters new/old is near chance, and the paper's adapters must make the new
model's queries work against the old gallery (ECC) and order the backfill
usefully. The first run trains and caches both backbones (minutes on 2 cores);
later runs read features from the cache.
"""
from __future__ import annotations

import numpy as np
import pytest

import backbones
from study.science.trial import TrialData, run_trial


@pytest.fixture(scope="module")
def pair() -> TrialData:
    feats = {(b, s): backbones.extract(b, "mnist", s, progress=False)
             for b in ("mnist_old", "mnist_new") for s in ("train", "test")}
    zero_shot = {"digits": backbones.extract("mnist_new", "digits", "test", progress=False)}
    return TrialData(feats["mnist_old", "train"], feats["mnist_new", "train"],
                     feats["mnist_old", "test"], feats["mnist_new", "test"], zero_shot)


@pytest.fixture(scope="module")
def runs(pair):
    cfg = dict(num_threads=1, seed=0)
    return {m: run_trial(dict(cfg, method=m, lam=6.0), pair) for m in ("independent", "lambda")}


def test_without_adapters_new_old_is_near_chance(runs):
    """Unrelated spaces: new queries against the old gallery are a few times chance at most
    (both nets see the same pixels, so not exactly chance), far below either model alone."""
    m = runs["independent"].metrics
    chance = 100.0 / 10
    assert m["new/old/top1"] < 4 * chance, m["new/old/top1"]
    assert m["new/old/top1"] < m["old/old/top1"] / 2
    assert m["old/old/top1"] > 5 * chance and m["new/new/top1"] > m["old/old/top1"]


def test_lambda_adapter_meets_ecc(runs):
    m = runs["lambda"].metrics
    assert m["B/old/top1"] > m["old/old/top1"], (m["B/old/top1"], m["old/old/top1"])
    assert m["ecc/B/old"] == 1.0 and m["ecc/new/old"] == 0.0


def test_paper_backfill_order_beats_random_on_average(runs):
    m, curves = runs["lambda"].metrics, runs["lambda"].curves
    assert m["backfill/auc_paper"] > m["backfill/auc_random"]
    assert np.mean(curves["backfill/paper"]) > np.mean(curves["backfill/random"])
