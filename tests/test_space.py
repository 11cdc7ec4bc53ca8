"""Search-space validation: the shipped spaces parse, bad input exits 2 with one clear line and writes nothing."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import backbones

from study.cli import main
from study.space import SpaceError, load_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SMOKE = yaml.safe_load((SPACES / "smoke.yaml").read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in SPACES.glob("*.yaml")))
def test_shipped_spaces_validate(name: str) -> None:
    spec = load_space(SPACES / name)
    assert spec.feature_keys()
    if spec.search.kind == "grid":
        assert spec.trials()


def test_grid_expansion_counts() -> None:
    spec = load_space(SPACES / "grid.yaml")
    n_lam = len(spec.lambdas) * len(spec.alphas)
    expected = len(spec.pairs) * len(spec.datasets) * len(spec.seeds) * (2 + n_lam)
    trials = spec.trials()
    assert len(trials) == expected
    assert len({(t["pair"], t["dataset"], t["method"], t["lam"], t["alpha"], t["seed"]) for t in trials}) == expected
    assert list(spec.trial_table().values()) == trials   # one entry per trial, in grid order
    # Each unique key once; old and new of both splits plus zero-shot sets of the new model.
    keys = spec.feature_keys()
    assert len(keys) == len(set(keys))
    assert {k.backbone for k in keys} == set(spec.backbone_names)


def _with(**changes: object) -> dict:
    space = yaml.safe_load(yaml.safe_dump(SMOKE))
    for dotted, value in changes.items():
        node = space
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if value is _DELETE:
            del node[parts[-1]]
        else:
            node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    return space


_DELETE = object()
LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
SEQ = {**{k: v for k, v in SMOKE.items() if k not in ("pairs", "optimize")}, "sequences": [LITE]}

# (case id, YAML text or dict, substrings the one-line error must contain)
BAD = [
    ("malformed-yaml", "name: x\npairs: [\n", ["malformed YAML", "line"]),
    ("not-a-mapping", "- 1\n- 2\n", ["<top level>", "mapping"]),
    ("unknown-key-did-you-mean", {**SMOKE, "lamdas": [1]}, ["lamdas", "did you mean `lambdas`"]),
    ("missing-pairs", _with(pairs=_DELETE), ["pairs", "required"]),
    ("name-with-slash", _with(name="a/b"), ["name", "not allowed"]),
    ("name-with-dotdot", _with(name="..evil"), ["name", "not allowed"]),
    ("unknown-backbone", _with(pairs__0__old="resnet9000"), ["pairs[0].old", "resnet9000", "allowed"]),
    ("unknown-dataset", _with(datasets__0__name="mnits"), ["datasets[0].name", "did you mean `mnist`"]),
    ("unknown-split", _with(datasets__0__eval="validation"), ["datasets[0].eval", "validation", "allowed"]),
    ("negative-lambda", _with(lambdas=[-1]), ["lambdas[0]", ">= 0"]),
    ("alpha-zero", _with(alpha=0), ["alpha[0]", "> 0"]),
    ("alpha-negative-list", _with(alpha=[1, -2]), ["alpha[1]", "> 0"]),
    ("empty-methods", _with(methods=[]), ["methods", "empty"]),
    ("lambda-without-lambdas", _with(lambdas=[]), ["lambdas", "empty"]),
    ("gpu-over-one", _with(resources={"cpu": 1, "gpu": 1.5}), ["resources.gpu", "<= 1"]),
    ("cpu-zero", _with(resources={"cpu": 0}), ["resources.cpu", "> 0"]),
    ("seeds-wrong-type", _with(seeds="0"), ["seeds", "a list"]),
    ("seed-bool", _with(seeds=[True]), ["seeds[0]", "boolean"]),
    ("dims-independent", _with(methods=["independent"]), ["pairs[0]", "d=128", "n=256"]),
    ("unknown-method", _with(methods=["orthgonal"]), ["methods[0]", "did you mean `orthogonal`"]),
    ("train-unknown-key", _with(train={"epoch": 3}), ["train.epoch", "did you mean `epochs`", "eval_every"]),
    ("train-wrong-type", _with(train={"epochs": "three"}), ["train.epochs", "integer"]),
    ("train-per-trial-key", _with(train={"seed": 3}), ["train.seed", "per trial"]),
    ("mode-unknown", _with(optimize={"metric": "B/old/top1", "mode": "maximize"}), ["optimize.mode", "max, min"]),
    ("scheduler-unknown", _with(scheduler={"kind": "pbt"}), ["scheduler.kind", "none, asha"]),
    ("optuna-needs-lambda", _with(search={"kind": "optuna"}), ["methods", "lambda"]),
    ("pair-missing-new", _with(pairs=[{"old": "mnist_old"}]), ["pairs[0].new", "required"]),
    ("index-unknown-factory", _with(index=[{"factory": "IVF8,Flatt"}]), ["index[0].factory", "cannot build", "allowed"]),
    ("index-pq-not-dividing-dim", _with(index=[{"factory": "IVF8,PQ7"}]), ["index[0].factory", "divide the dim 128", "allowed"]),
    ("index-more-lists-than-points", _with(index=[{"factory": "IVF5000,Flat"}]), ["index[0].factory", "4000 points", "allowed"]),
    ("index-unknown-search-param", _with(index=[{"factory": "IVF8,Flat", "nprob": 2}]), ["index[0].nprob", "did you mean `nprobe`", "allowed"]),
    ("index-param-of-another-kind", _with(index=[{"factory": "HNSW32", "nprobe": 2}]), ["index[0].nprobe", "allowed for it: efSearch"]),
    ("index-nprobe-over-nlist", _with(index=[{"factory": "IVF8,Flat", "nprobe": 9}]), ["index[0].nprobe", "<= the 8 IVF lists"]),
    ("index-name-twice", _with(index=[{"factory": "Flat"}, {"factory": "HNSW32", "name": "Flat"}]), ["index[1].name", "its own"]),
    ("index-in-train", _with(train={"index": []}), ["train.index", "top-level `index:`"]),
    ("train-equals-eval", _with(datasets=[{"name": "mnist", "train": "test", "eval": "test"}]), ["datasets[0].eval", "differ"]),
    ("feature-dtype-unknown", _with(features={"dtype": "bfloat16"}), ["features.dtype", "float32, float16"]),
    ("features-unknown-key", _with(features={"precision": "float16"}), ["features", "precision"]),
    ("synthetic-bad-sizes", _with(datasets=[{"name": "synthetic-c1-train10-test10"}]), ["datasets[0].name", ">= 2 classes"]),
    ("synthetic-misspelt", _with(datasets=[{"name": "synthetic-c10-train10"}]),
     ["datasets[0].name", "synthetic-c<classes>-train<N>-test<M>"]),
    ("duplicate-lambda", _with(lambdas=[1, 3, 3.0]), ["lambdas[2]", "`3` is listed twice", "lambdas[1]"]),
    ("duplicate-alpha", _with(alpha=[10, 10]), ["alpha[1]", "`10` is listed twice"]),
    ("duplicate-seed", _with(seeds=[0, 1, 0]), ["seeds[2]", "`0` is listed twice"]),
    ("duplicate-method", _with(methods=["lambda", "affine", "lambda"]), ["methods[2]", "`lambda` is listed twice"]),
    ("duplicate-pair", _with(pairs=[{"old": "mnist_old", "new": "mnist_new"}] * 2),
     ["pairs[1]", "`mnist_old->mnist_new` is listed twice"]),
    ("duplicate-dataset", _with(datasets=[{"name": "mnist"}, {"name": "mnist", "train": "test", "eval": "train"}]),
     ["datasets[1]", "`mnist` is listed twice"]),
    ("duplicate-zero-shot", _with(zero_shot=["digits", {"name": "digits", "split": "train"}]),
     ["zero_shot[1]", "`digits` is listed twice"]),
    ("lambdas-same-trial-name", _with(lambdas=[3, 3.0000001]),
     ["same trial name", "lambda3", "lam 3.0 and 3.0000001", "6 significant digits"]),
    ("alphas-same-trial-name", _with(alpha=[10, 10.000001]), ["same trial name", "alpha 10.0 and 10.000001"]),
    ("metric-typo", _with(optimize={"metric": "B/old/top7"}), ["optimize.metric", "B/old/top7", "did you mean `B/old/top"]),
    ("metric-unknown-zero-shot-set", _with(optimize={"metric": "zs/digit"}), ["optimize.metric", "did you mean `zs/digits`"]),
    ("metric-topk-not-computed", _with(optimize={"metric": "B/old/top10"}), ["optimize.metric", "B/old/top10"]),
    ("search-metric-typo", _with(search={"metrics": ["B/old/top1", "zs/maen"], "modes": ["max", "max"]}),
     ["search.metrics[1]", "did you mean `zs/mean`"]),
    ("synthetic-backbone-real-data", _with(pairs=[{"old": "synthetic_128", "new": "synthetic_256"}]),
     ["pairs[0].old", "synthetic_128", "only synthetic", "mnist"]),
    ("sequence-and-pairs", {**SMOKE, "sequences": [LITE]}, ["sequences", "cannot be mixed with `pairs`"]),
    ("sequence-two-models", {**SEQ, "sequences": [LITE[:2]]}, ["sequences[0]", "at least 3 backbones", "got 2"]),
    ("sequence-repeated-model", {**SEQ, "sequences": [[*LITE, LITE[0]]]},
     ["sequences[0][3]", "`tf_efficientnet_lite0` is listed twice"]),
    ("sequence-unknown-backbone", {**SEQ, "sequences": [{"models": [LITE[0], "resnet9000", LITE[2]]}]},
     ["sequences[0].models[1]", "resnet9000", "allowed"]),
    ("sequence-without-backward-adapter", {**SEQ, "methods": ["independent"]},
     ["methods[0]", "trains no backward adapter"]),
    ("sequence-compose-unknown", {**SEQ, "compose": "tree"}, ["compose", "`tree`", "chain, direct"]),
    ("compose-without-sequences", {**SMOKE, "compose": "direct"}, ["compose", "`sequences` only"]),
    ("sequence-optuna", {**SEQ, "methods": ["lambda"], "search": {"kind": "optuna"}}, ["search.kind", "allowed: grid"]),
    ("sequence-metric-of-pairs", {**SEQ, "optimize": {"metric": "B/old/top1"}},
     ["optimize.metric", "B/old/top1", "seq/"]),
]


def _write(tmp_path: Path, content: str | dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.mark.parametrize("case,content,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_space_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case, content, needles) -> None:
    path = _write(tmp_path, content)
    storage, db = tmp_path / "ray_results", tmp_path / "mlflow.db"
    code = main(["--space", str(path), "--storage", str(storage), "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert str(path) in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not storage.exists() and not db.exists()


def test_missing_space_file(tmp_path, capsys) -> None:
    code = main(["--space", str(tmp_path / "nope.yaml"), "--storage", str(tmp_path / "rr")])
    assert code == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "rr").exists()


def test_bad_name_option(tmp_path, capsys) -> None:
    code = main(["--space", str(SPACES / "smoke.yaml"), "--name", "../x", "--storage", str(tmp_path / "rr")])
    assert code == 2
    assert "--name" in capsys.readouterr().err


def test_dry_run_counts(capsys) -> None:
    assert main(["--space", str(SPACES / "grid.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(load_space(SPACES / 'grid.yaml').trials())} trials" in out


def test_space_error_is_value_error() -> None:
    err = SpaceError("f.yaml", "a.b", "bad")
    assert str(err) == "f.yaml: a.b: bad" and isinstance(err, ValueError)


def test_ray_workers_do_not_import_the_backbone_registry() -> None:
    """A trial's worker unpickles study.tune.run_one: that import must not pull timm/torchvision
    (about 110 MB per worker) through study.space."""
    import subprocess
    import sys

    code = "import sys, study.tune; print(sorted(m for m in ('backbones', 'timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_synthetic_space_parses_sizes_from_the_name(tmp_path) -> None:
    space = _with(pairs=[{"old": "synthetic_128", "new": "tf_efficientnet_lite0"}],
                  datasets=[{"name": "synthetic-c7-train300-test50-s3"}], zero_shot=[], features={"dtype": "float16"})
    spec = load_space(_write(tmp_path, space))
    assert spec.feature_dtype == "float16"
    cfg = backbones.dataset_cfg(spec.datasets[0].dataset)
    assert cfg.num_classes == 7 and cfg.splits == ("train", "test") and spec.datasets[0].eval == "test"
    assert len(backbones.load_dataset(cfg.name, "train")) == 300  # noise images for the real backbone


def test_index_section_reaches_every_trial_config() -> None:
    from study.science.config import TrialConfig
    from study.tune import trial_config

    spec = load_space(SPACES / "index.yaml")
    for trial in spec.trials():
        cfg = TrialConfig.from_dict(trial_config(trial))
        assert [s.name for s in cfg.index] == ["Flat", "IVF64_Flat", "IVF64_PQ16", "HNSW32"]
        assert cfg.index[2].nprobe == 8 and cfg.index[3].efSearch == 64
    assert "index" not in load_space(SPACES / "smoke.yaml").train


def test_metric_keys_follow_the_space(tmp_path) -> None:
    """A zero-shot set's keys and a `train.topk` k are accepted as metrics; the check uses study.science.keys."""
    spec = load_space(_write(tmp_path, _with(optimize={"metric": "zs/digits/B_top1"}, train={"topk": [1, 10]},
                                             search={"metrics": ["B/old/top10", "zs/digits"], "modes": ["max", "max"]})))
    assert spec.metric == "zs/digits/B_top1" and spec.search.metrics == ("B/old/top10", "zs/digits")


def test_per_pair_zero_shot_metric_must_hold_for_every_pair(tmp_path) -> None:
    """`zs/digits` when only the second pair evaluates digits: not a key every trial reports."""
    space = _with(pairs=[{"old": "mnist_old", "new": "mnist_new", "zero_shot": []},
                         {"old": "mnist_old", "new": "mnist_old"}], optimize={"metric": "zs/digits"})
    with pytest.raises(SpaceError, match=r"optimize\.metric.*zs/digits"):
        load_space(_write(tmp_path, space))


def test_train_error_lists_only_keys_allowed_under_train(tmp_path) -> None:
    with pytest.raises(SpaceError) as err:
        load_space(_write(tmp_path, _with(train={"epoch": 3})))
    allowed = set(str(err.value).split("allowed: ", 1)[1].split(", "))
    assert {"epochs", "lr", "topk"} <= allowed
    assert not allowed & {"method", "lam", "alpha", "seed"}


def test_a_method_registered_alone_is_accepted_and_ordered(tmp_path, monkeypatch) -> None:
    """The parser and the report take method names and order from study.science.config.METHODS."""
    from study.science.config import METHODS, MethodSpec
    from study.report import _sort_key

    monkeypatch.setitem(METHODS, "affine_twin", MethodSpec("affine", True, "compat", None, order=-1))
    spec = load_space(_write(tmp_path, _with(methods=["affine_twin", "lambda"])))
    assert spec.methods == ("affine_twin", "lambda")
    cell = ("mnist_old->mnist_new", "mnist")
    assert sorted([(*cell, "lambda", "1"), (*cell, "affine_twin", "")], key=_sort_key)[0][2] == "affine_twin"


def test_readme_method_list_matches_the_registry() -> None:
    """search_spaces/README.md lists every registered method, in registry order, and nothing else."""
    from study.science.config import list_methods

    row = next(line for line in (SPACES / "README.md").read_text().splitlines() if line.startswith("| `methods` |"))
    listed = re.findall(r"`([a-z_]+)`", row.split("|")[2])
    assert listed == list_methods()


def test_documented_defaults_are_trialconfigs() -> None:
    """The schema's defaults of TrialConfig fields (the `alpha` row, `name` = value in the `train` row)
    are TrialConfig's, and every field the `train` row names exists."""
    import dataclasses

    from study.science.config import TrialConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrialConfig)}
    rows = {line.split("|")[1].strip(): line.split("|") for line in (SPACES / "README.md").read_text().splitlines()
            if line.startswith("| `")}
    assert yaml.safe_load(rows["`alpha`"][3].strip().strip("`")) == defaults["alpha"]
    quoted = re.findall(r"`(\w+)` = ([^,;( ]+)", rows["`train`"][4])
    assert len(quoted) >= 10
    for name, value in quoted:
        assert name in defaults, name
        assert yaml.safe_load(value) == defaults[name], (name, value, defaults[name])


def test_readme_fault_table_counts_the_bad_cases() -> None:
    readme = (SPACES.parent / "README.md").read_text()
    assert f"| bad input: {len(BAD)} cases in one table" in readme


def test_sequence_space_expands_per_sequence_and_keys_every_model(tmp_path: Path) -> None:
    spec = load_space(_write(tmp_path, {**SEQ, "compose": "direct", "sequences": [{"models": LITE, "zero_shot": []}]}))
    trials = spec.trials()
    assert len(trials) == len(spec.methods) * len(spec.seeds) == 3
    assert all(t["models"] == LITE and t["compose"] == "direct" and t["zero_shot"] == [] for t in trials)
    assert spec.metric == "seq/AM/top1"
    # every model on both splits; no zero-shot keys (the sequence's own empty list wins)
    assert [str(k) for k in spec.feature_keys()] == [f"{m}|mnist|{s}" for m in LITE for s in ("test", "train")]
    spec = load_space(_write(tmp_path, SEQ))
    assert {(k.backbone, k.dataset) for k in spec.feature_keys() if k.dataset == "digits"} == \
        {(m, "digits") for m in LITE[1:]}   # the oldest model is never mapped
