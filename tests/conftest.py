"""Shared fixtures: where ../shared is, and the real offline models built from it (slow tests only)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import XLMRobertaModel

from modeling_xclip.tiny import EMBED_DIM, tiny_text_config, tiny_tokenizer

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


@pytest.fixture(scope="session")
def published_mclip(tmp_path_factory):
    """A random text-only checkpoint in the published M-CLIP layout: config.json with `"model_type": "M-CLIP"` and
    no `auto_map`, a local `modelBase` directory, `transformer.*` + `LinearTransformation.*` weights, tokenizer files.
    Returns `.path`, and `.encoder` and `.linear` for a reference forward."""
    root = tmp_path_factory.mktemp("published_mclip")
    torch.manual_seed(0)
    encoder = XLMRobertaModel(tiny_text_config(len(tiny_tokenizer())))  # with its pooler, as published
    encoder.save_pretrained(root / "base")
    linear = torch.nn.Linear(encoder.config.hidden_size, EMBED_DIM)
    state = {f"transformer.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    state.update({"LinearTransformation.weight": linear.weight.detach(), "LinearTransformation.bias": linear.bias.detach()})
    path = root / "model"
    path.mkdir()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "_name_or_path": "M-CLIP/tiny", "architectures": ["MultilingualCLIP"], "model_type": "M-CLIP",
        "modelBase": str(root / "base"), "numDims": EMBED_DIM, "transformerDimensions": encoder.config.hidden_size}))
    tiny_tokenizer().save_pretrained(path)
    return SimpleNamespace(path=path, encoder=encoder.eval(), linear=linear)
