"""Test-wide settings: offline hub, a per-session feature cache, few threads."""
from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("LAMBDA_COMPAT_CACHE", tempfile.mkdtemp(prefix="lambda-compat-test-cache-"))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
