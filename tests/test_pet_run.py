"""run_pet end to end on a synthetic world whose weakest languages lag; --push_to_hub with a fake upload;
xclip-eval --adapters; the real xlmr-me5-small on the XTD sample (slow)."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from datasets_builders import load
from modeling_xclip.losses import contrastive_loss
from modeling_xclip.tiny import EMBED_DIM, build_tiny_model
from training_scripts import pet, run_eval, run_pet

SEED = 0
NUM_IMAGES = 400
STRONG = ["en", "de", "fr"]
LANGUAGES = ["en", "de", "ru", "ja"]
PRETRAIN_STEPS = 300


def concept_vectors(concepts):
    """An image vector per concept, the sum of a random vector per attribute (size, colour, shape, position): a text
    encoder that reads the attributes generalises to unseen concepts."""
    generator = torch.Generator().manual_seed(SEED)
    parts = [c.split("-", 3) for c in sorted(set(concepts))]
    attribute = {(slot, value): torch.randn(EMBED_DIM, generator=generator)
                 for p in parts for slot, value in enumerate(p)}
    return {"-".join(p): sum(attribute[slot, value] for slot, value in enumerate(p)) for p in parts}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~50x faster than oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """A tiny M-CLIP trained on en/de/fr only (other languages lag), and image vectors per concept."""
    root = tmp_path_factory.mktemp("pet_world")
    loaded = {lang: load("synthetic", lang, num_images=NUM_IMAGES) for lang in set(STRONG + LANGUAGES)}
    splits = {s: {lang: loaded[lang][s] for lang in loaded} for s in ("train", "validation", "test")}
    concepts = [c for s in splits.values() for c in s["en"]["concept"]]
    table = concept_vectors(concepts)
    rows = {str(i): table[c].tolist() for s in splits.values() for i, c in zip(s["en"]["image_id"], s["en"]["concept"])}
    features = root / "features.parquet"
    pd.DataFrame({"image_id": list(rows), "image_embeds": list(rows.values())}).to_parquet(features)

    model, processor = build_tiny_model("m-clip", seed=SEED)
    torch.manual_seed(SEED)
    model.train()
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if n.split(".")[0] in
                                  ("transformer", "LinearTransformation")], lr=2e-3)
    texts = [(c, table[k]) for lang in STRONG for c, k in zip(splits["train"][lang]["caption"],
                                                               splits["train"][lang]["concept"])]
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(PRETRAIN_STEPS):
        batch = [texts[i] for i in torch.randperm(len(texts), generator=generator)[:32].tolist()]
        tokens = processor.tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        loss = contrastive_loss(text, F.normalize(torch.stack([v for _, v in batch]), dim=-1), temperature=0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return {"base": root / "base", "features": features, "root": root}


def run(world, out, *extra):
    run_pet.main(["--base", str(world["base"]), "--dataset", "synthetic", "--dataset_options", f"num_images={NUM_IMAGES}",
                  "--image_features", str(world["features"]), "--output_dir", str(out), "--seed", str(SEED),
                  "--use_cpu", "true", *extra])
    return json.loads((out / "results.json").read_text())


def test_lora_routine1_mse_lifts_the_weakest_languages(world, monkeypatch):
    uploads = []

    def fake_upload(**kwargs):
        """upload_folder's choice of files: those matching an allow pattern (if any) and no ignore pattern."""
        folder = Path(kwargs["folder_path"])
        from fnmatch import fnmatch
        paths = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        files = sorted(path for path in paths
                       if any(fnmatch(path, pat) for pat in kwargs.get("allow_patterns") or ["*"])
                       and not any(fnmatch(path, pat) for pat in kwargs.get("ignore_patterns") or []))
        uploads.append((kwargs["repo_id"], files))

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: repo_id)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload)

    out = world["root"] / "lora"
    report = run(world, out, "--pet_method", "lora", "--languages", *LANGUAGES, "--alignment", "routine1",
                 "--alignment_loss", "mse", "--alignment_weight", "0.5", "--max_steps", "40", "--eval_steps", "10",
                 "--learning_rate", "3e-3", "--push_to_hub", "user/mclip-lora")
    zero = {lang: report["zero_shot"]["per_language"][lang]["r1_mean"] for lang in LANGUAGES}
    trained = {lang: report["per_language"][lang]["r1_mean"] for lang in LANGUAGES}
    print("\nzero-shot r1_mean", zero, report["zero_shot"]["summary"]["r1_mean"])
    print("LoRA+routine1/MSE", trained, report["summary"]["r1_mean"])
    weakest = sorted(LANGUAGES, key=zero.get)[:2]
    assert all(trained[lang] > zero[lang] for lang in weakest), (weakest, zero, trained)
    assert report["summary"]["r1_mean"]["std"] < report["zero_shot"]["summary"]["r1_mean"]["std"]
    assert report["summary"]["r1_mean"]["range"] < report["zero_shot"]["summary"]["r1_mean"]["range"]

    # outputs: adapters per language, the Table 1 comparison, the card; the upload holds exactly these
    assert "zero-shot (base)" in (out / "results.md").read_text()
    card = (out / "README.md").read_text()
    assert "model-index" in card and "PeftModel.from_pretrained" in card
    expected = sorted([f"{lang}/{name}" for lang in LANGUAGES for name in
                       ("adapter_config.json", "adapter_model.safetensors", pet.PET_FILE)]
                      + ["README.md", "results.json", "results.md", "results.png"])
    assert uploads == [("user/mclip-lora", expected)]
    # nothing uploaded names a path of this machine (the base, the features and the output are local dirs)
    local = str(world["root"].resolve())
    leaks = [name for name in expected if local in (out / name).read_bytes().decode("utf-8", "replace")]
    assert not leaks, leaks

    # a second run skips languages that have results
    before = (out / "de" / "adapter_model.safetensors").stat().st_mtime_ns
    run(world, out, "--pet_method", "lora", "--languages", "de", "--max_steps", "2")
    assert (out / "de" / "adapter_model.safetensors").stat().st_mtime_ns == before

    # xclip-eval --adapters: each language with its own adapter gives run_pet's test numbers
    run_eval.main(["--model", str(world["base"]), "--adapters", str(out), "--dataset", "synthetic",
                   "--dataset_options", f"num_images={NUM_IMAGES}", "--image_features", str(world["features"]),
                   "--languages", *LANGUAGES, "--output_dir", str(world["root"] / "eval"), "--device", "cpu"])
    evaluated = json.loads((world["root"] / "eval" / "results.json").read_text())
    for lang in LANGUAGES:
        assert evaluated["per_language"][lang]["r1_mean"] == pytest.approx(trained[lang])


def test_an_interrupted_language_resumes_to_the_same_adapter_and_only_from_its_own_run(world, monkeypatch, capsys):
    """Checkpoints are the Trainer's (OUT/checkpoints/{lang}); a resumed run ends with the weights of an uninterrupted
    one, a checkpoint of another run (here another λ) is refused, and unfinished checkpoints are never overwritten."""
    from safetensors.torch import load_file

    flags = ["--pet_method", "lora", "--languages", "de", "--alignment", "routine1", "--max_steps", "6",
             "--eval_steps", "2", "--learning_rate", "3e-3"]
    run(world, world["root"] / "straight", *flags)

    out = world["root"] / "resumed"
    original = pet.PETTrainer.training_step

    def crash(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise RuntimeError("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pet.PETTrainer, "training_step", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(world, out, *flags)
    monkeypatch.setattr(pet.PETTrainer, "training_step", original)
    assert (out / "checkpoints" / "de" / "checkpoint-2").is_dir() and not (out / "de").exists()

    for extra, message in ((["--alignment_weight", "0.7", "--resume_from_checkpoint", "true"], "from another run"),
                           ([], "holds checkpoints of an unfinished de run")):
        with pytest.raises(SystemExit):
            run(world, out, *flags, *extra)
        assert message in capsys.readouterr().err
    run(world, out, *flags, "--resume_from_checkpoint", "true")
    assert not (out / "checkpoints").exists()
    straight = load_file(world["root"] / "straight" / "de" / "adapter_model.safetensors")
    resumed = load_file(out / "de" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_real_weights_lora_routine1_on_the_xtd_sample(offline_models, shared_dir, tmp_path):
    """LoRA + routine-1 MSE on the M-CLIP format of the real xlmr-me5-small, XTD sample few-shot (5/5/90); image
    vectors are the same encoder's embeddings of the English captions."""
    from transformers import AutoTokenizer

    from modeling_xclip import MCLIPModel
    from training_scripts.embeddings import Encoder, load_model

    encoder_dir = offline_models("xlmr-me5-small")
    data_dir = shared_dir / "data" / "xtd-sample"
    torch.manual_seed(SEED)
    model = MCLIPModel.from_pretrained_towers(text=str(encoder_dir), numDims=384).eval()
    model.save_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    tokenizer.save_pretrained(tmp_path / "base")
    english = load("xtd", "en", data_dir=str(data_dir), variant="fewshot")
    ids = [str(i) for s in english.values() for i in s["image_id"]]
    captions = [c for s in english.values() for c in s["caption"]]
    vectors = Encoder.from_model(load_model(str(tmp_path / "base")), tokenizer).texts(captions)
    features = tmp_path / "features.parquet"
    pd.DataFrame({"image_id": ids, "image_embeds": vectors.tolist()}).to_parquet(features)

    out = tmp_path / "out"
    languages = ["en", "de", "ja"]
    run_pet.main(["--base", str(tmp_path / "base"), "--dataset", "xtd", "--data_dir", str(data_dir),
                  "--dataset_options", "variant=fewshot", "--image_features", str(features), "--languages", *languages,
                  "--pet_method", "lora", "--alignment", "routine1", "--alignment_loss", "mse",
                  "--max_steps", "6", "--eval_steps", "3", "--per_device_train_batch_size", "5",
                  "--output_dir", str(out), "--use_cpu", "true", "--seed", str(SEED)])
    report = json.loads((out / "results.json").read_text())
    for name, block in (("zero-shot", report["zero_shot"]), ("LoRA + routine1/MSE", report)):
        r1 = {lang: round(block["per_language"][lang]["r1_mean"], 2) for lang in languages}
        summary = block["summary"]["r1_mean"]
        print(f"\n{name}: R@1 {r1}, Std {summary['std']:.2f}, Range {summary['range']:.2f}")
    assert report["zero_shot"]["per_language"]["en"]["r1_mean"] == 100.0  # images are the English captions' vectors
    assert all((out / lang / "adapter_model.safetensors").exists() for lang in languages)
    assert report["sizes"]["de"]["texts"] == 90
