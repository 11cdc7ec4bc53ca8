"""Test-wide settings: offline hub, a per-session feature cache, few threads."""
from __future__ import annotations

import os
import tempfile
from typing import Iterator

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("LAMBDA_COMPAT_CACHE", tempfile.mkdtemp(prefix="lambda-compat-test-cache-"))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on 2 shared cores, two spinning threads run many times slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
