"""Per-language PET: alignment losses against independent formulas, Compacter's Kronecker sum, which parameters
each method trains, the shares on XLM-R large, the round trip of every method in a fresh process, and bad input."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from modeling_xclip.losses import alignment_loss, pet_alignment_loss
from modeling_xclip.pet_xclip import CompacterBottleneck
from modeling_xclip.tiny import build_tiny_model
from training_scripts import pet, run_pet
from training_scripts.embeddings import text_features

TEXTS = ["ein Hund im Schnee", "a red circle", "一只猫", "un chat"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- losses ---------------------------------------------------------------------------------------------------------
def info_nce(a, b, tau):
    """-1/N sum_i log(exp(cos(a_i, b_i)/tau) / sum_j exp(cos(a_i, b_j)/tau)), written out row by row."""
    total = 0.0
    for i in range(len(a)):
        sims = [float(torch.dot(a[i], b[j]) / (a[i].norm() * b[j].norm())) / tau for j in range(len(b))]
        total += -(sims[i] - np.log(np.sum(np.exp(sims))))
    return total / len(a)


def test_alignment_losses_match_the_paper_formulas():
    generator = torch.Generator().manual_seed(0)
    pivot, target, image = (torch.randn(5, 8, generator=generator) for _ in range(3))
    mse = float(((pivot - target) ** 2).sum() / pivot.numel())                                     # eq. 7
    assert float(alignment_loss(pivot, target, "mse")) == pytest.approx(mse, rel=1e-6)
    cl = (info_nce(pivot, target, 0.01) + info_nce(target, pivot, 0.01)) / 2                       # eq. 8, both ways
    assert float(alignment_loss(pivot, target, "cl_pivot_target")) == pytest.approx(cl, rel=1e-5)
    cl_image = (info_nce(pivot, image, 0.01) + info_nce(image, pivot, 0.01)) / 2
    assert float(alignment_loss(pivot, target, "cl_pivot_image", image=image)) == pytest.approx(cl_image, rel=1e-5)
    # eq. 9: L_i2t + L_t2i + λ L_alignment
    l_i2t, l_t2i = info_nce(image, target, 0.01), info_nce(target, image, 0.01)
    total = pet_alignment_loss(target, image, pivot=pivot, kind="mse", weight=0.3)
    assert float(total) == pytest.approx(l_i2t + l_t2i + 0.3 * mse, rel=1e-5)
    assert float(pet_alignment_loss(target, image)) == pytest.approx(l_i2t + l_t2i, rel=1e-5)
    with pytest.raises(ValueError, match="unknown alignment loss 'l1'"):
        alignment_loss(pivot, target, "l1")


def test_compacter_weights_are_a_kronecker_sum_with_shared_rules():
    torch.manual_seed(0)
    layer = CompacterBottleneck(32, 8, k=4, rank=1)
    torch.nn.init.normal_(layer.up_t)
    down, up = layer.weights()
    expected_down = sum(torch.kron(layer.phm_rule[i], layer.down_s[i] @ layer.down_t[i]) for i in range(4))
    expected_up = sum(torch.kron(layer.phm_rule[i], layer.up_s[i] @ layer.up_t[i]) for i in range(4))
    torch.testing.assert_close(down, expected_down)
    torch.testing.assert_close(up, expected_up)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), torch.nn.functional.gelu(x @ expected_down + layer.down_bias) @ expected_up
                               + layer.up_bias)


# --- what trains ----------------------------------------------------------------------------------------------------
HEAD_AND_NORMS = ("LinearTransformation", "LayerNorm")
OWN = {"lora": ("lora_A", "lora_B"), "adapter": ("pet_adapter.lora_bottleneck",),
       "compacter": ("pet_compacter.lora_bottleneck",), "prompt": ("prompt_encoder",),
       "linear": ("LinearTransformation.ln_tuning_layers",), "full": ("ln_tuning_layers",)}


@pytest.mark.parametrize("method", ["lora", "adapter", "compacter", "prompt", "linear", "full"])
def test_gradients_reach_only_what_the_method_trains(method, tmp_path):
    model, processor = build_tiny_model("m-clip", save_dir=tmp_path / "base")
    model = pet.add_pet(model, method, "de", prompt_init_text="a photo of", tokenizer_path=str(tmp_path / "base"))
    tokens = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    loss = text_features(model, tokens["input_ids"], tokens["attention_mask"]).square().sum()
    loss.backward()
    got_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert got_grad and got_grad <= trainable
    allowed = OWN[method] + (HEAD_AND_NORMS if method in ("lora", "adapter", "compacter") else ())
    assert all(any(part in name for part in allowed) for name in trainable), sorted(trainable)
    assert all(".modules_to_save." in name or any(part in name for part in OWN[method]) for name in trainable)
    if method in ("lora", "adapter", "compacter"):  # the head and every LayerNorm train too, per language
        assert any("LinearTransformation.modules_to_save.de" in name for name in got_grad)
        assert any("LayerNorm.modules_to_save.de" in name for name in got_grad)


def test_shares_on_xlmr_large_are_within_the_papers():
    for method, paper in pet.PAPER_SHARE.items():
        share = pet.trainable_share(pet.meta_mclip(), method)
        print(f"\n{method}: {share['method_parameters']:,} parameters = {share['method_percent']:.3f}% of the "
              f"XLM-R-large M-CLIP text encoder (paper {paper}%); with the linear head and LayerNorms "
              f"{share['trainable_percent']:.3f}%")
        assert 0 < share["method_percent"] <= paper


# --- round trip in a fresh process ------------------------------------------------------------------------------------
# A fresh interpreter that never imports this repository: the base's saved remote code and PEFT only.
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer
    from peft import PeftModel
    torch.set_num_threads(1)  # as the test: the same reduction order, so the comparison can be bitwise
    base_dir, root, out = sys.argv[1], sys.argv[2], sys.argv[3]
    texts = %r
    tokens = AutoTokenizer.from_pretrained(base_dir)(texts, padding=True, return_tensors="pt")
    vectors = {}
    for method in json.loads(sys.argv[4]):
        base = AutoModel.from_pretrained(base_dir, trust_remote_code=True).eval()
        assert "modeling_xclip" not in sys.modules
        model = PeftModel.from_pretrained(base, f"{root}/{method}", subfolder="de", adapter_name="de").eval()
        model.load_adapter(f"{root}/{method}", adapter_name="fr", subfolder="fr")
        with torch.no_grad():
            for language in ("de", "fr", "de"):
                model.set_adapter(language)
                if model.peft_config[language].is_prompt_learning:
                    dummy = torch.zeros(1, base.config.numDims)
                    v = model(**tokens, image_embeds=dummy).text_model_output.pooler_output
                else:
                    v = model.get_text_features(**tokens).pooler_output
                vectors[f"{method}.{language}"] = v.contiguous()
    save_file(vectors, out)
""" % (TEXTS,))
ROUND_TRIP = ["lora", "adapter", "compacter", "prompt", "linear", "full"]


def test_every_method_round_trips_in_a_fresh_process(tmp_path):
    from safetensors.torch import load_file

    base_dir = tmp_path / "base"
    _, processor = build_tiny_model("m-clip", save_dir=base_dir)
    assert (base_dir / "pet_xclip.py").exists()
    tokens = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    expected = {}
    for method in ROUND_TRIP:
        model = None
        for index, language in enumerate(("de", "fr")):
            if model is None:
                from training_scripts.embeddings import load_model
                model = load_model(str(base_dir))
            torch.manual_seed(index + 1)
            model = pet.add_pet(model, method, language, prompt_init_text=None, num_virtual_tokens=2)
            with torch.no_grad():  # move every trainable parameter off its initial value
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.randn_like(p))
            model.eval()
            with torch.no_grad():
                expected[f"{method}.{language}"] = text_features(model, tokens["input_ids"],
                                                         tokens["attention_mask"])
            pet.save_language(model, tmp_path / method, language, {"method": method})
        assert expected[f"{method}.de"].ne(expected[f"{method}.fr"]).any()
    out = tmp_path / "vectors.safetensors"
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(base_dir), str(tmp_path), str(out),
                             json.dumps(ROUND_TRIP)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_file(out)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_an_adapter_checkpoint_loads_as_nothing_else(tmp_path):
    """Adapter and Compacter name their own hosts: without them (a plain encoder) PEFT finds no target."""
    from peft import PeftModel
    from transformers import XLMRobertaModel

    model, _ = build_tiny_model("m-clip")
    pet.save_language(pet.add_pet(model, "adapter", "de"), tmp_path, "de", {"method": "adapter"})
    config = json.loads((tmp_path / "de" / "adapter_config.json").read_text())
    assert config["target_modules"] == r".*\.pet_adapter"
    plain = XLMRobertaModel(model.config.text_config)
    with pytest.raises(ValueError, match="[Tt]arget modules"):
        PeftModel.from_pretrained(plain, str(tmp_path), subfolder="de")


# --- bad input ------------------------------------------------------------------------------------------------------
def test_adapter_folder_errors_name_the_fault(tmp_path):
    model, _ = build_tiny_model("m-clip")
    meta = {"method": "adapter", "base": pet.base_identity(model), "hard_prompt": "{}"}
    pet.save_language(pet.add_pet(model, "adapter", "de"), tmp_path, "de", meta)
    with pytest.raises(FileNotFoundError, match=r"no adapter for language 'ja'.*\['de'\]"):
        pet.load_language_adapter(build_tiny_model("m-clip")[0], tmp_path, "ja")
    from modeling_xclip import MCLIPModel
    from modeling_xclip.tiny import tiny_config

    config = tiny_config("m-clip", vision=False)
    config.numDims = 8
    other = MCLIPModel(config)
    with pytest.raises(ValueError, match=r"trained on another base.*numDims: adapter 16 vs base 8"):
        pet.load_language_adapter(other, tmp_path, "de")
    loaded, meta = pet.load_language_adapter(build_tiny_model("m-clip")[0], tmp_path, "de")
    assert loaded.active_adapter == "de" and meta["method"] == "adapter"


def test_translations_and_prompts_errors(tmp_path):
    target = (["a", "a", "b"], ["x0", "x1", "y0"])
    english = (["a", "a", "b"], ["A0", "A1", "B0"])
    assert pet.pair_texts("de", target, english, "routine1") == (["x0", "x1", "y0"], ["A0", "A1", "B0"])
    assert pet.pair_texts("en", english, english, "routine1") == (["A0", "A1", "B0"], None)
    with pytest.raises(ValueError, match="routine2 needs --translations"):
        pet.pair_texts("de", target, english, "routine2")
    path = tmp_path / "mt.tsv"
    path.write_text("language\timage_id\tcaption_index\tcaption_en\n de\ta\t0\tT0\n".replace(" de", "de"))
    table = pet.read_translation_column(path, "caption_en")
    with pytest.raises(ValueError, match=r"mt.tsv: 2 of 3 'de' captions have no caption_en.*\('a', 1\)"):
        pet.pair_texts("de", target, english, "routine3", table, path)
    with pytest.raises(ValueError, match="lacks columns \\['caption_translated'\\]"):
        pet.read_translation_column(path, "caption_translated")
    with pytest.raises(ValueError, match=r"hard prompt 'a photo of' needs exactly one \{\}"):
        pet.hard_prompts("a photo of", ["de"])
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"de": "ein Foto von {}", "ja": "写真"}))
    with pytest.raises(ValueError, match="language 'ja'"):
        pet.hard_prompts(str(prompts), ["de", "ja"])


@pytest.mark.parametrize("flags,message", [
    (["--pet_method", "bitfit"], "unknown PET method 'bitfit'"),
    (["--alignment", "routine4"], "unknown alignment routine 'routine4'"),
    (["--alignment_loss", "l1"], "unknown alignment loss 'l1'"),
    (["--alignment", "routine3"], "routine3 needs --translations"),
])
def test_run_pet_rejects_bad_flags(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_pet.main(["--base", str(tmp_path), "--output_dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
