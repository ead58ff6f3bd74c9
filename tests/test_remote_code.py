"""Saved models are Hub-native: remote code, auto_map, safetensors, and loading in a fresh process."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_xclip.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
REMOTE_CODE = [REPO / "modeling_xclip" / "configuration_xclip.py", REPO / "modeling_xclip" / "modeling_xclip.py",
               REPO / "modeling_xclip" / "losses.py", REPO / "modeling_xclip" / "pet_xclip.py",
               REPO / "processing" / "processing_xclip.py"]
# public transformers modules remote code may import from; everything under transformers.models.* and any
# underscore-prefixed module or name is private
PUBLIC_MODULES = {"transformers", "transformers.modeling_outputs", "transformers.utils", "transformers.initialization"}
TEXTS = ["ein Hund im Schnee", "a red circle", "一只猫"]

# Runs in a fresh interpreter that never imports this repository's packages: only the saved directory's code is used.
LOAD_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoProcessor
    path, out = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "modeling_xclip" not in sys.modules and "processing" not in sys.modules
    images = [Image.new("RGB", (40, 36), (10 * i, 200 - 30 * i, 90)) for i in range(2)]
    inputs = processor(text=%r, images=images)
    with torch.no_grad():
        logits = model(**inputs).logits_per_text
    np.savez(out, logits=logits.numpy(), input_ids=inputs["input_ids"].numpy(), template=processor.text_template,
             model_type=config.model_type, has_clip_text=model.clip_text_model is not None)
""" % (TEXTS,))


def load_in_fresh_process(path, tmp_path):
    out = tmp_path / "out.npz"
    subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(path), str(out)], check=True, cwd=tmp_path,
                   capture_output=True, text=True)
    return np.load(out)


@pytest.mark.parametrize("family,keep_clip_text", [("altclip", False), ("m-clip", False), ("mclip", True),
                                                   ("mclip", False)])
def test_auto_round_trip_with_remote_code(tmp_path, family, keep_clip_text):
    model, processor = build_tiny_model(family, text_template="a photo of {}")
    if not keep_clip_text and model.clip_text_model is not None:
        model.remove_clip_text_model()
    save_dir = tmp_path / "model"
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)

    config = json.loads((save_dir / "config.json").read_text())
    assert config["model_type"] == model.config.model_type
    assert config["auto_map"]["AutoModel"].startswith("modeling_xclip.")
    assert {p.name for p in save_dir.glob("*.py")} == {"configuration_xclip.py", "modeling_xclip.py", "losses.py",
                                                       "pet_xclip.py", "processing_xclip.py"}
    assert (save_dir / "model.safetensors").exists() and not list(save_dir.glob("*.bin"))
    assert (config["clip_text_config"] is not None) == keep_clip_text

    loaded = load_in_fresh_process(save_dir, tmp_path)
    assert str(loaded["template"]) == "a photo of {}" and bool(loaded["has_clip_text"]) == keep_clip_text
    images = [Image.new("RGB", (40, 36), (10 * i, 200 - 30 * i, 90)) for i in range(2)]
    inputs = processor(text=TEXTS, images=images)
    np.testing.assert_array_equal(inputs["input_ids"].numpy(), loaded["input_ids"])
    with torch.no_grad():
        expected = model.eval()(**inputs).logits_per_text.numpy()
    np.testing.assert_array_equal(expected, loaded["logits"])


def test_mclip_without_clip_text_tower_still_scores(tmp_path):
    model, processor = build_tiny_model("mclip")
    model.remove_clip_text_model().save_pretrained(tmp_path / "m")
    from modeling_xclip import XMCLIPModel

    reloaded = XMCLIPModel.from_pretrained(tmp_path / "m")
    assert reloaded.clip_text_model is None
    with pytest.raises(ValueError, match="without its CLIP text tower"):
        reloaded.get_clip_text_features(torch.tensor([[0, 5, 3]]))


def _transformers_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            yield node.module, [alias.name for alias in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "transformers":
                    yield alias.name, [], node.lineno


def test_remote_code_imports_only_public_transformers_api():
    offences = []
    for path in REMOTE_CODE:
        for module, names, line in _transformers_imports(path):
            if module not in PUBLIC_MODULES or any(n.startswith("_") for n in names):
                offences.append(f"{path.name}:{line}: from {module} import {', '.join(names)}")
    assert not offences, "private transformers imports in remote code:\n" + "\n".join(offences)


def test_private_import_check_catches_offences(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from transformers.models.clip.modeling_clip import CLIPEncoder\nfrom transformers import _x\n")
    found = list(_transformers_imports(bad))
    assert [m for m, _, _ in found] == ["transformers.models.clip.modeling_clip", "transformers"]
    assert found[0][0] not in PUBLIC_MODULES and found[1][1] == ["_x"]


def test_remote_code_files_import_each_other_relatively():
    for path in REMOTE_CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in {"modeling_xclip", "processing", "datasets_builders",
                                                         "training_scripts"}, f"{path.name} imports {node.module}"
