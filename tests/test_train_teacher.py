"""Teacher learning (training_scripts/teacher_learning.py, run_teacher_learning.py) on tiny models: the loss against
its formula, the least-squares head, the pairs, cached versus uncached targets, the script end to end, bad input,
resume, and learning on the synthetic world."""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, CLIPConfig, CLIPModel, TrainingArguments, XLMRobertaModel

from modeling_xclip import MCLIPConfig, MCLIPModel, XAltCLIPModel
from modeling_xclip.losses import teacher_mse_loss
from modeling_xclip.tiny import (EMBED_DIM, build_tiny_model, tiny_clip_text_config, tiny_config,
                                 tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config)
from training_scripts import run_teacher_learning
from training_scripts import teacher_learning as tl

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO / "tests" / "fixtures" / "multi30k"


# --- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def towers(tmp_path_factory):
    """Tiny pretrained parts: a student encoder, a mean-pooling teacher encoder (both XLM-R, hidden 32) and a CLIP
    checkpoint (its image tower, and its text tower as the AltCLIP teacher)."""
    root = tmp_path_factory.mktemp("towers")
    tokenizer = tiny_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        XLMRobertaModel(tiny_text_config(len(tokenizer)), add_pooling_layer=False).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    torch.manual_seed(2)
    clip = CLIPConfig(text_config=tiny_clip_text_config(len(tokenizer)).to_dict(),
                      vision_config=tiny_vision_config().to_dict(), projection_dim=EMBED_DIM)
    CLIPModel(clip).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    tiny_image_processor().save_pretrained(root / "clip")
    return {name: str(root / name) for name in ("student", "teacher", "clip")}


def args(towers, output_dir, family="m-clip", pooling="mean", *extra):
    teacher = towers["clip"] if pooling == "clip" else towers["teacher"]
    argv = ["--model_family", family, "--student", towers["student"], "--teacher", teacher,
            "--teacher_pooling", pooling, "--dataset", "multi30k", "--data_dir", str(MULTI30K),
            "--dataset_options", "variant=parallel", "--languages", "de", "fr", "--output_dir", str(output_dir),
            "--feature_cache_dir", str(Path(output_dir).parent / "cache"), "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--warmup_steps", "0", "--num_train_epochs", "2", "--save_strategy", "no",
            "--text_template", "query: {}", "--report_to", "none"]
    if family == "altclip":
        argv += ["--clip", towers["clip"]]
    return argv + [str(a) for a in extra]


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


# --- the loss and its parts -----------------------------------------------------------------------------------------
def test_teacher_mse_loss_is_the_mean_squared_error_over_rows_and_dimensions():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    expected = sum((student[i, j] - teacher[i, j]) ** 2 for i in range(5) for j in range(7)) / 35
    loss = teacher_mse_loss(student, teacher)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.allclose(student.grad, 2 * (student - teacher).detach() / 35)
    with pytest.raises(ValueError, match="width"):
        teacher_mse_loss(student, teacher[:, :6])


def test_least_squares_head_is_the_normal_equations_solution():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    y = x @ torch.randn(6, 4) + torch.randn(4) + 0.1 * torch.randn(200, 4)
    weight, bias = tl.least_squares_head(x, y)
    design = torch.cat([x, torch.ones(200, 1)], 1).double()
    solution = torch.linalg.solve(design.T @ design, design.T @ y.double())  # (X'X)^-1 X'y, written independently
    assert torch.allclose(weight.double(), solution[:-1].T, atol=1e-5)
    assert torch.allclose(bias.double(), solution[-1], atol=1e-5)
    # ridge: (X'X + λ s D) w = X'y, D the identity on the weights and 0 on the bias, s the features' centred sum of
    # squares per dimension
    ridge = 0.5
    scale = ((x - x.mean(0)) ** 2).sum().double() / 6
    penalty = torch.diag(torch.tensor([1.0] * 6 + [0.0], dtype=torch.float64)) * ridge * scale
    solution = torch.linalg.solve(design.T @ design + penalty, design.T @ y.double())
    weight, bias = tl.least_squares_head(x, y, ridge=ridge)
    assert torch.allclose(weight.double(), solution[:-1].T, atol=1e-5)
    assert torch.allclose(bias.double(), solution[-1], atol=1e-5)


def test_pairs_give_one_english_row_per_sentence_and_one_row_per_translation():
    de = datasets.Dataset.from_dict({"source": ["a dog", "a cat"], "caption": ["ein Hund", "eine Katze"]})
    fr = datasets.Dataset.from_dict({"source": ["a dog", "a bird"], "caption": ["un chien", "un oiseau"]})
    rows, english = tl.build_pairs({"de": de, "fr": fr})
    assert english == ["a dog", "a cat", "a bird"]
    pairs = sorted((r["language"], r["text"], english[r["target"]]) for r in rows)
    assert pairs == sorted([("en", "a dog", "a dog"), ("en", "a cat", "a cat"), ("en", "a bird", "a bird"),
                            ("de", "ein Hund", "a dog"), ("de", "eine Katze", "a cat"),
                            ("fr", "un chien", "a dog"), ("fr", "un oiseau", "a bird")])


def test_student_vectors_through_forward_are_the_families_own():
    tokenizer = tiny_tokenizer()
    batch = tokenizer(["ein Hund im Schnee", "a cat"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    altclip = XAltCLIPModel(tiny_config("altclip", clip_text=True)).eval()
    mclip = MCLIPModel(tiny_config("m-clip", vision=False)).eval()
    with torch.no_grad():
        assert torch.allclose(tl.student_features(altclip, batch["input_ids"], batch["attention_mask"]),
                              altclip.get_student_features(batch["input_ids"], batch["attention_mask"]))
        assert torch.allclose(tl.student_features(mclip, batch["input_ids"], batch["attention_mask"]),
                              mclip.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output)
        # the head's input, as the least-squares fit sees it
        for model in (altclip, mclip):
            head = tl.student_head(model)
            assert torch.allclose(head(tl.student_pooled(model, batch["input_ids"], batch["attention_mask"])),
                                  tl.student_features(model, batch["input_ids"], batch["attention_mask"]), atol=1e-6)
        # the CLIP teacher is the model's get_teacher_features (pooled end-of-text state)
        teacher = tl.Teacher(altclip.clip_text_model, tokenizer, "clip")
        assert teacher.width == altclip.config.text_transformation_dim
        assert torch.allclose(teacher(batch["input_ids"], batch["attention_mask"]),
                              altclip.get_teacher_features(batch["input_ids"], batch["attention_mask"]))


def test_cached_and_uncached_steps_give_the_same_loss_and_weights(towers, tmp_path):
    teacher = tl.Teacher.from_pretrained(towers["teacher"], "mean")
    tokenizer = tiny_tokenizer()
    de = datasets.Dataset.from_dict({"source": ["a red circle", "a blue star", "a big green square"],
                                     "caption": ["ein roter Kreis", "ein blauer Stern", "ein großes grünes Quadrat"]})
    rows, english = tl.build_pairs({"de": de})
    runs = {}
    for mode in ("cached", "uncached"):
        torch.manual_seed(0)
        config = MCLIPConfig(modelBase=towers["student"], numDims=teacher.width,
                             text_config=tiny_text_config(len(tokenizer)))
        model = MCLIPModel(config)
        model.freeze("text")
        collator = (tl.TeacherLearningCollator(tokenizer, 32, targets=teacher.encode(english)) if mode == "cached"
                    else tl.TeacherLearningCollator(tokenizer, 32, english=english, teacher=teacher))
        training = TrainingArguments(output_dir=str(tmp_path / mode), per_device_train_batch_size=3, max_steps=2,
                                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                                     seed=0)
        trainer = tl.TeacherLearningTrainer(model=model, args=training, train_dataset=datasets.Dataset.from_list(rows),
                                            data_collator=collator, teacher=teacher if mode == "uncached" else None)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[mode] = (losses, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if mode == "cached":
            batch = collator(rows[:3])
            assert set(batch) == {"input_ids", "attention_mask", "teacher_embeds"}
    assert len(runs["cached"][0]) == 2
    assert runs["cached"][0] == pytest.approx(runs["uncached"][0], rel=1e-5)
    # Adam divides by the gradient's own size, so float noise in a zero gradient (attention key biases) moves a weight
    # by up to the learning rate: weights agree to far below the 1e-3 steps, not bit for bit
    for name, value in runs["cached"][1].items():
        assert torch.allclose(value, runs["uncached"][1][name], atol=1e-4), name


# --- the script -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,pooling", [("m-clip", "mean"), ("altclip", "clip")])
def test_script_trains_and_saves_a_model_auto_classes_load(towers, tmp_path, family, pooling):
    out = tmp_path / "out"
    features = image_features_file(tmp_path / "images.parquet", EMBED_DIM if family == "altclip" else 32)
    trainer = run_teacher_learning._main(args(towers, out, family, pooling, "--logging_steps", "1",
                                              "--eval_split", "val", "--image_features", features))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6  # 3 English + 6 translated rows, batches of 4, 2 epochs
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.text_template == "query: {}"
    assert getattr(model, "clip_text_model", None) is None  # the teacher is not part of the saved model
    teacher_dir = towers["clip"] if pooling == "clip" else towers["teacher"]
    teacher = tl.Teacher.from_pretrained(teacher_dir, pooling)
    assert tl.target_width(model) == teacher.width
    # the saved student maps every training sentence (with its template) near the teacher's vector of its English side
    rows, english = training_rows()
    targets = teacher.encode(english)
    texts = processor(text=[r["text"] for r in rows])
    with torch.no_grad():
        fitted = F.mse_loss(tl.student_features(model, texts["input_ids"], texts["attention_mask"]),
                            targets[[r["target"] for r in rows]])
        tl.student_head(model).reset_parameters()
        untrained = F.mse_loss(tl.student_features(model, texts["input_ids"], texts["attention_mask"]),
                               targets[[r["target"] for r in rows]])
    assert fitted < 0.2 * untrained, (fitted, untrained)
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_language"]) == {"de", "fr"} and results["split"] == "val"
    card = (out / "README.md").read_text()
    assert "model-index" in card and "teacher learning" in card and "text_transformation" not in card.split("---")[1]
    # the card names the teacher, but no directory of this machine: a local one by its last part
    assert f"teacher: `{Path(teacher_dir).name}`" in card and str(teacher_dir) not in card
    assert f"| teacher_pooling | `{pooling}` |" in card


def image_features_file(path, width):
    """Random image vectors for the Multi30K fixture's images (retrieval during training needs image vectors)."""
    import pandas as pd

    image_ids = sorted({line.strip() for split in ("train", "val")
                        for line in (MULTI30K / "data/task1/image_splits" / f"{split}.txt").read_text().splitlines()})
    torch.manual_seed(0)
    pd.DataFrame({"image_id": image_ids, "image_embeds": torch.randn(len(image_ids), width).tolist()}).to_parquet(path)
    return str(path)


def training_rows():
    from datasets_builders import load

    return tl.build_pairs({language: load("multi30k", language, split="train", data_dir=str(MULTI30K),
                                          variant="parallel") for language in ("de", "fr")})


@pytest.fixture
def no_training_step(monkeypatch):
    """Fails the test if a training step runs: bad input must be refused before."""
    def step(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(tl.TeacherLearningTrainer, "training_step", step)


def test_a_teacher_of_another_width_is_refused_before_training(towers, tmp_path, no_training_step):
    build_tiny_model("m-clip", save_dir=tmp_path / "mclip16", vision=False)  # regresses 16-d vectors
    argv = args(towers, tmp_path / "out")
    argv[argv.index("--student") + 1] = str(tmp_path / "mclip16")
    with pytest.raises(ValueError, match=r"teacher's vectors are 32-d .* regresses 16-d"):
        run_teacher_learning._main(argv)


def test_a_dataset_without_the_english_side_is_refused(towers, tmp_path, no_training_step):
    argv = args(towers, tmp_path / "out")
    argv[argv.index("variant=parallel")] = "variant=task1"
    with pytest.raises(ValueError, match="lacks column.*source"):
        run_teacher_learning._main(argv)


def test_a_language_the_dataset_lacks_is_refused(towers, tmp_path, no_training_step):
    argv = args(towers, tmp_path / "out")
    argv[argv.index("fr")] = "ja"
    with pytest.raises(ValueError, match="ja"):
        run_teacher_learning._main(argv)
    # the command line reports it in one line, exit status 2
    with pytest.raises(SystemExit) as exit_info:
        run_teacher_learning.main(argv)
    assert exit_info.value.code == 2


def test_a_saved_model_is_not_overwritten_and_a_foreign_checkpoint_is_refused(towers, tmp_path, no_training_step):
    build_tiny_model("m-clip", save_dir=tmp_path / "out", vision=False)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        run_teacher_learning._main(args(towers, tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    # a checkpoint of another stage (here: written by a contrastive run) cannot be resumed by teacher learning
    checkpoint = tmp_path / "other" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "xclip_run.json").write_text(json.dumps({"stage": "contrastive", "model_family": "altclip"}))
    with pytest.raises(ValueError, match="another run"):
        run_teacher_learning._main(args(towers, tmp_path / "new", "m-clip", "mean",
                                        "--resume_from_checkpoint", checkpoint))


def test_resume_from_a_checkpoint_ends_with_the_same_weights(towers, tmp_path):
    common = ["--save_strategy", "steps", "--save_steps", "3", "--seed", "3"]
    run_teacher_learning._main(args(towers, tmp_path / "full", "m-clip", "mean", *common))
    assert (tmp_path / "full" / "checkpoint-3").is_dir()
    run_teacher_learning._main(args(towers, tmp_path / "resumed", "m-clip", "mean", *common,
                                    "--resume_from_checkpoint", tmp_path / "full" / "checkpoint-3"))
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.allclose(full[name], resumed[name], atol=1e-6), name


def test_runs_as_a_file_under_accelerate_launch(towers, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               str(REPO / "training_scripts" / "run_teacher_learning.py"),
               *args(towers, tmp_path / "out", "m-clip", "mean", "--num_train_epochs", "1")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True) is not None
    assert "xclip-train-teacher = training_scripts.run_teacher_learning:main" in (REPO / "setup.cfg").read_text()


# --- learning on the synthetic world ----------------------------------------------------------------------------------
SYNTHETIC_LANGUAGES = ["de", "fr", "es", "it", "pl", "ru", "zh", "ja", "ko"]


def synthetic_parallel(root, num_images):
    """The synthetic world as a Parquet dataset in our schema with a `source` column: every language's caption with
    the English caption of the same image (one config per language, train and test splits)."""
    from datasets_builders import load

    configs = []
    for language in SYNTHETIC_LANGUAGES:
        files = []
        for split in ("train", "test"):
            english = load("synthetic", "en", split=split, num_images=num_images)
            source = dict(zip(english["image_id"], english["caption"]))
            ds = load("synthetic", language, split=split, num_images=num_images).remove_columns(["image"])
            ds = ds.add_column("source", [source[i] for i in ds["image_id"]])
            (root / language).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(root / language / f"{split}.parquet")
            files.append(f"  - split: {split}\n    path: {language}/{split}.parquet")
        configs.append(f"- config_name: {language}\n  data_files:\n" + "\n".join(files))
    (root / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    return root


def test_altclip_stage1_learns_the_teachers_space_in_every_language(towers, tmp_path):
    """AltCLIP stage 1 on the synthetic world: after teacher learning, each language's test captions retrieve the
    CLIP teacher's vectors of the English captions of their concept far above chance."""
    from datasets_builders import load
    from training_scripts.metrics import retrieval_metrics

    data = synthetic_parallel(tmp_path / "data", 400)
    out = tmp_path / "altclip"
    run_teacher_learning._main([
        "--model_family", "altclip", "--student", towers["student"], "--teacher", towers["clip"],
        "--teacher_pooling", "clip", "--clip", towers["clip"], "--dataset", str(data), "--output_dir", str(out),
        "--feature_cache_dir", "none", "--per_device_train_batch_size", "64", "--learning_rate", "3e-3",
        "--warmup_steps", "0", "--weight_decay", "0", "--num_train_epochs", "6", "--dropout", "0",
        "--save_strategy", "no", "--report_to", "none", "--seed", "0"])
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    teacher = tl.Teacher.from_pretrained(towers["clip"], "clip")
    english = load("synthetic", "en", split="test", num_images=400)
    keys = {concept: i for i, concept in enumerate(dict.fromkeys(english["concept"]))}
    gallery = F.normalize(teacher.encode(english["caption"]), dim=-1)
    chance = 100 / len(keys)
    tokenizer = tiny_tokenizer()
    scores = {}
    for language in ["en", *SYNTHETIC_LANGUAGES]:
        ds = load("synthetic", language, split="test", num_images=400)
        batch = tokenizer(list(ds["caption"]), padding=True, return_tensors="pt")
        with torch.no_grad():
            queries = F.normalize(model.get_student_features(batch["input_ids"], batch["attention_mask"]), dim=-1)
        scores[language] = retrieval_metrics(queries, [keys[c] for c in ds["concept"]], gallery,
                                             [keys[c] for c in english["concept"]])["t2i"]["R@1"]
    print(f"\nAltCLIP stage 1 on the synthetic world, R@1 of the teacher's English vectors (chance {chance:.1f}%):",
          scores)
    # 40 test captions per language (one hit = 2.5 points): above chance in every language, far above on average
    assert all(score > 1.5 * chance for score in scores.values()), scores
    assert sum(scores.values()) / len(scores) > 4 * chance, scores
