"""Shared fixtures: where ../shared is, and the real offline models built from it (slow tests only)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    """`../shared` beside the repository (data, papers, tools); the test is skipped where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (a user's clone has none)")
    return SHARED


@pytest.fixture(scope="session")
def offline_models(shared_dir):
    """Builds the real models of ../shared/tools/offline_models.py once (cached across runs) and returns a function
    name -> directory. Needs PyPI (the script downloads wheels); skipped where the build fails."""
    root = Path(os.environ.get("XCLIP_OFFLINE_MODELS", Path.home() / ".cache" / "xclip" / "offline_models"))

    def get(name):
        target = root / name
        if not (target / "config.json").exists() and not (target / "vocab.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            result = subprocess.run([sys.executable, str(shared_dir / "tools" / "offline_models.py"), str(root),
                                     "--only", name], capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"could not build {name}: {result.stderr[-500:]}")
        return target

    return get
