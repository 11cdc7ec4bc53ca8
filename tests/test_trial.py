"""run_trial end to end on tiny synthetic features, the config and the key contract."""
from __future__ import annotations

import ast
import math
import pathlib
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from study.science import keys as K
from study.science import metrics
from study.science.config import METHODS, TrialConfig
from study.science.trial import TrialData, TrialResult, load_adapters, run_trial

torch.set_num_threads(1)


def _data(d=8, n=8, N=80, seed=0, zero_shot=("z1", "z2")):
    rng = np.random.default_rng(seed)
    y = np.arange(2 * N) % 4
    lat = rng.normal(size=(4, 6))[y] + rng.normal(size=(2 * N, 6))
    old = lat @ rng.normal(size=(6, d))
    new = lat @ rng.normal(size=(6, n)) + 0.1 * rng.normal(size=(2 * N, n))
    part = lambda a, s: NS(x=a[s].astype(np.float32), y=y[s])  # noqa: E731
    tr, ev = slice(0, N), slice(N, 2 * N)
    zs = {name: NS(x=rng.normal(size=(30, n)).astype(np.float32), y=np.arange(30) % 3) for name in zero_shot}
    return TrialData(part(old, tr), part(new, tr), part(old, ev), part(new, ev), zs)


FAST = dict(epochs=3, batch_size=32, lr=1e-2, num_threads=1, backfill_points=5, eval_every=2)


# ---------------------------------------------------------------------------
# config
def test_config_defaults_follow_the_paper():
    cfg = TrialConfig(method="lambda", lam=12)
    assert (cfg.lr, cfg.reg_weight) == (1e-3, 1.0)
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg


def test_config_unknown_key_suggests_and_lists():
    with pytest.raises(ValueError, match=r"unknown key `config\.lamda`; did you mean 'lam'\? Allowed keys: .*alpha"):
        TrialConfig.from_dict({"method": "lambda", "lamda": 3})


@pytest.mark.parametrize(
    "bad,pattern",
    [
        ({"method": "lamda"},
         r"`config\.method` = 'lamda' is not allowed; did you mean 'lambda'\? Allowed values: 'orthogonal'"),
        ({"method": "lambda"}, r"`config\.lam` is required for method 'lambda'"),
        ({"method": "affine", "distance": "cos"}, r"`config\.distance` .*Allowed values: 'cosine', 'l2'"),
        ({"method": "affine", "epochs": 2.5}, r"`config\.epochs` must be an integer"),
        ({"method": "affine", "epochs": True}, r"`config\.epochs` must be an integer"),
        ({"method": "affine", "topk": [5]}, r"`config\.topk` must .*including 1"),
        ({"method": "affine", "topk": [1, "x"]}, r"`config\.topk\[1\]` must be an integer"),
        ({"method": "affine", "lr": -1}, r"`config\.lr` must be a finite number > 0"),
        ({"lam": 1}, r"missing key `config\.method`"),
    ],
)
def test_config_errors_name_the_key_and_the_allowed_values(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrialConfig.from_dict(bad)


def test_config_coerces_what_search_libraries_give():
    cfg = TrialConfig.from_dict({"method": "lambda", "lam": "inf", "epochs": 40.0, "topk": [1, 5, 10]})
    assert cfg.lam == math.inf and cfg.epochs == 40 and cfg.topk == (1, 5, 10)


# ---------------------------------------------------------------------------
# every method: the documented keys, floats, NaN where undefined
@pytest.fixture(scope="module")
def results():
    data = _data()
    return data, {m: run_trial(dict(FAST, method=m, lam=1.0), data) for m in METHODS}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_metrics_are_exactly_the_documented_keys(results, method):
    _, res = results
    r = res[method]
    assert isinstance(r, TrialResult)
    assert list(r.metrics) == K.final_keys(["z1", "z2"])
    assert all(type(v) is float for v in r.metrics.values())
    for k in ("old/old/top1", "new/new/mAP", "new/old/top5"):  # d = n here: new/old defined
        assert 0.0 <= r.metrics[k] <= 100.0
    if METHODS[method].backward is not None:
        finite = [k for k in r.metrics if not k.startswith("time/")]
        assert all(math.isfinite(r.metrics[k]) for k in finite), [k for k in finite if not math.isfinite(r.metrics[k])]


def test_independent_has_nan_adapter_rows(results):
    r = results[1]["independent"]
    for row in ("F/old", "F/F", "B/F", "B/old", "B/B"):
        assert math.isnan(r.metrics[f"{row}/top1"])
    for k in ("orth/B", "gain/B/B", "zs/z1", "zs/mean", "ecc/B/old", "loss/total"):
        assert math.isnan(r.metrics[k])
    assert r.metrics["epoch"] == 0.0 and r.state == {}
    assert r.metrics["ecc/new/old"] in (0.0, 1.0)


def test_fct_keeps_the_new_space(results):
    r = results[1]["fct"]
    assert r.metrics["B/B/top1"] == r.metrics["new/new/top1"]
    assert r.metrics["zs/mean"] == 0.0 and r.metrics["orth/B"] == 0.0
    assert set(r.state) == {"F.weight", "F.bias"}
    assert load_adapters(r.state)[0] is None


def test_backfill_curve_ends_match_the_rows(results):
    """beta = 0: B(new) queries against the F(old) gallery (= B/F); beta = 1: against B(new) (= B/B)."""
    r = results[1]["lambda"]
    paper, rand, beta = r.curves["backfill/paper"], r.curves["backfill/random"], r.curves["backfill/beta"]
    assert beta == pytest.approx(list(np.linspace(0, 1, 5)))
    for curve in (paper, rand):  # M = mAP by default
        assert curve[0] == pytest.approx(r.metrics["B/F/mAP"])
        assert curve[-1] == pytest.approx(r.metrics["B/B/mAP"])
    assert r.metrics["backfill/auc_paper"] == pytest.approx(metrics.curve_area(beta, paper))


def test_ecc_and_gain_follow_the_rows(results):
    m = results[1]["affine"].metrics
    assert m["ecc_margin/B/old"] == pytest.approx(m["B/old/top1"] - m["old/old/top1"])
    assert m["ecc/B/old"] == float(m["B/old/top1"] > m["old/old/top1"])
    assert m["gain/B/B"] == pytest.approx(m["B/B/top1"] - m["new/new/top1"])
    assert m["zs/mean"] == pytest.approx((m["zs/z1"] + m["zs/z2"]) / 2)
    assert m["zs/z1"] == pytest.approx(m["zs/z1/B_top1"] - m["zs/z1/new_top1"])


def test_state_rebuilds_the_adapters_that_were_scored(results):
    data, res = results
    r = res["lambda"]
    B, F = load_adapters(r.state)
    xn = torch.nn.functional.normalize(torch.as_tensor(data.new_eval.x), dim=1)
    y = data.new_eval.y
    with torch.no_grad():
        bn = B(xn).numpy()
    top1 = metrics.retrieval(bn, bn, y, y, leave_one_out=True)["top1"]
    assert top1 == pytest.approx(r.metrics["B/B/top1"])
    assert r.config["method"] == "lambda" and r.config["lam"] == 1.0


def test_on_epoch_gets_every_epoch_key_each_epoch():
    seen = []
    run_trial(dict(FAST, method="orthogonal", epochs=5), _data(), on_epoch=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2, 3, 4, 5]
    for _, m in seen:
        assert set(K.EPOCH_KEYS) <= set(m)
        assert all(math.isfinite(m[k]) for k in K.EPOCH_KEYS)
    # eval every 2 epochs plus the first and last; carried forward in between
    assert [m["eval_epoch"] for _, m in seen] == [1.0, 2.0, 2.0, 4.0, 5.0]


@pytest.mark.parametrize("d,n", [(5, 8), (8, 5)])
def test_different_dims_truncate_to_the_smaller(d, n):
    data = _data(d=d, n=n, zero_shot=("z",))
    r = run_trial(dict(FAST, method="lambda", lam=1.0), data)
    m = min(d, n)
    y = data.new_eval.y
    ref = metrics.retrieval(data.new_eval.x[:, :m], data.old_eval.x[:, :m], y, y, leave_one_out=True)
    assert r.metrics["new/old/top1"] == pytest.approx(ref["top1"])
    for row in ("new/old", "F/old", "F/F", "B/F", "B/old", "B/B"):
        assert math.isfinite(r.metrics[f"{row}/top1"])
    assert r.state["B.weight"].shape == (n, n) and r.state["F.weight"].shape == (n, d)
    assert math.isfinite(r.metrics["backfill/auc_paper"])


def test_trial_data_rejects_mismatched_pairs():
    good = _data()
    with pytest.raises(ValueError, match="differ"):
        TrialData(good.old_train, NS(x=good.new_train.x, y=good.new_train.y[::-1]), good.old_eval, good.new_eval)
    with pytest.raises(ValueError, match="zero-shot set name"):
        TrialData(good.old_train, good.new_train, good.old_eval, good.new_eval, {"a/b": good.new_eval})


def test_zero_shot_keys():
    assert K.zs_keys(["cub"]) == ["zs/cub", "zs/cub/new_top1", "zs/cub/B_top1", "zs/mean"]
    assert set(K.FINAL_KEYS) >= {"B/old/top1", "B/B/mAP", "orth/B", "backfill/auc_paper", "epoch"}
    with pytest.raises(ValueError):
        K.zs_keys(["mean"])


SCIENCE = pathlib.Path(K.__file__).parent  # the study.science package


def _imports(path: pathlib.Path) -> set[str]:
    """Top-level packages a module's source imports (absolute imports; the package's own relative ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add("." if node.level else node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", sorted(SCIENCE.glob("*.py")), ids=lambda p: p.name)
def test_no_science_module_imports_ray_mlflow_or_yaml(path):
    found = _imports(path)
    assert not found & {"ray", "mlflow", "yaml", "optuna"}, found
    assert "." not in found, "absolute imports only"


def test_the_science_imports_nothing_of_the_runner():
    runner = {p.stem for p in SCIENCE.parent.glob("*.py")} - {"__init__"}
    for path in SCIENCE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("study"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                assert not any(n.split(".")[1] in runner for n in names if n.count(".") >= 1), (path.name, names)


@pytest.mark.parametrize("module", ["study.science.config", "study.science.keys"])
def test_config_and_keys_are_cheap_to_import(module):
    """The spec parser and the CLI import these: neither torch nor faiss (nor Ray, MLflow) loads."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'faiss', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_center_shifts_every_split_by_the_train_mean():
    data = _data()
    r = run_trial(dict(FAST, method="orthogonal", center=True), data)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    mu = unit(data.old_train.x).mean(0)
    y = data.old_eval.y
    ref = metrics.retrieval(unit(data.old_eval.x) - mu, unit(data.old_eval.x) - mu, y, y, leave_one_out=True)
    assert r.metrics["old/old/mAP"] == pytest.approx(ref["mAP"], rel=1e-6)
    assert r.metrics["zs/z1"] == 0.0  # still the same (centred) new space: orthogonal B keeps it


def test_normalize_rows_gives_unit_rows_in_float32():
    from study.science.trial import normalize_rows

    x = np.random.default_rng(0).normal(size=(50, 7)) * 3.0
    out = normalize_rows(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)


def _stored(data: TrialData, folder: pathlib.Path, dtype=np.float32) -> TrialData:
    """The same features as read-only memory maps of .npy files (as the feature cache serves them)."""
    count = iter(range(100))

    def part(f):
        path = folder / f"{next(count)}.npy"
        np.save(path, np.asarray(f.x, dtype=dtype))
        return NS(x=np.load(path, mmap_mode="r"), y=f.y)

    return TrialData(part(data.old_train), part(data.new_train), part(data.old_eval), part(data.new_eval),
                     {k: part(v) for k, v in data.zero_shot.items()})


def _same_trial(a: TrialResult, b: TrialResult) -> None:
    for k, v in a.metrics.items():
        if not k.startswith("time/"):
            assert v == b.metrics[k] or (math.isnan(v) and math.isnan(b.metrics[k])), k
    for k, v in a.state.items():
        assert torch.equal(v, b.state[k]), k


@pytest.mark.parametrize("method,center", [("lambda", False), ("orthogonal", True), ("independent", False)])
def test_memory_mapped_features_give_the_same_trial(tmp_path, method, center):
    """Trials read cache entries as read-only memory maps, a batch at a time: same numbers, bit for bit."""
    data = _data(d=6, n=8)
    cfg = dict(FAST, method=method, lam=1.0, center=center)
    _same_trial(run_trial(cfg, data), run_trial(cfg, _stored(data, tmp_path)))


def test_float16_features_train_as_their_float32_values(tmp_path):
    """float16 storage: each batch is cast to float32, exactly as if the float16 values had been stored as float32."""
    data = _data(d=6, n=8)
    as16 = _stored(data, tmp_path, np.float16)
    up = lambda f: NS(x=np.asarray(f.x, dtype=np.float32), y=f.y)  # noqa: E731
    upcast = TrialData(up(as16.old_train), up(as16.new_train), up(as16.old_eval), up(as16.new_eval),
                       {k: up(v) for k, v in as16.zero_shot.items()})
    cfg = dict(FAST, method="lambda", lam=1.0, center=True)
    _same_trial(run_trial(cfg, as16), run_trial(cfg, upcast))
