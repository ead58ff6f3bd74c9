"""The shared training infrastructure: argument checks, data checks, run identity on resume, evaluation during
training, the model card, and the one feature cache."""
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from modeling_xclip.tiny import build_tiny_model
from training_scripts.embeddings import cached_features
from training_scripts.training import (RUN_FILE, DataArguments, RetrievalEvaluator, XCLIPTrainer, check_images,
                                       check_output_dir, check_resume, finish, load_languages, results_record,
                                       save_model_card)

SYNTHETIC = ["num_images=60"]


def data_args(**kwargs):
    return DataArguments(**{"dataset_options": SYNTHETIC, **kwargs})


def test_an_output_dir_holding_a_model_is_not_overwritten(tmp_path):
    check_output_dir(tmp_path)                      # empty: fine
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        check_output_dir(tmp_path)
    check_output_dir(tmp_path, overwrite=True)


def test_languages_and_columns_are_checked_before_training():
    with pytest.raises(ValueError, match=r"--languages xx: dataset 'synthetic' has no such language"):
        load_languages(data_args(languages=["de", "xx"]), "train")
    with pytest.raises(ValueError, match=r"\(de, split train\) lacks column\(s\) source needed for teacher learning"):
        load_languages(data_args(languages=["de"]), "train", columns=["source"], purpose="teacher learning")
    loaded = load_languages(data_args(languages=["de", "fr"]), "train", columns=["caption", "image"], max_samples=7)
    assert list(loaded) == ["de", "fr"] and [len(ds) for ds in loaded.values()] == [7, 7]


def test_images_or_features_are_required(tmp_path):
    loaded = load_languages(data_args(languages=["de"]), "train")
    check_images(loaded, data_args())
    without_pixels = {"de": loaded["de"].remove_columns("image")}
    with pytest.raises(ValueError, match=r"\(de\) has no image pixels .* --image_features"):
        check_images(without_pixels, data_args())
    check_images(without_pixels, data_args(image_features="feats.parquet"))


def test_a_checkpoint_resumes_only_its_own_run(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint of an xclip training run"):
        check_resume(tmp_path, {"stage": "trikd"})
    (tmp_path / RUN_FILE).write_text(json.dumps({"stage": "trikd", "model": "a"}))
    check_resume(tmp_path, {"stage": "trikd", "model": "a"})
    with pytest.raises(ValueError, match="stage: checkpoint 'trikd', this run 'teacher_learning'"):
        check_resume(tmp_path, {"stage": "teacher_learning", "model": "a"})


def test_feature_cache_computes_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).view(2, 3)

    first = cached_features(tmp_path, {"model": "m", "texts": ["a", "b"]}, compute)
    again = cached_features(tmp_path, {"texts": ["a", "b"], "model": "m"}, compute)
    other = cached_features(tmp_path, {"model": "m", "texts": ["a", "c"]}, compute)
    assert len(calls) == 2 and torch.equal(first, again) and torch.equal(first, other)
    for path in tmp_path.glob("*.safetensors"):      # a corrupt cache file is computed again, not an error
        path.write_bytes(b"not safetensors")
    assert torch.equal(cached_features(tmp_path, {"model": "m", "texts": ["a", "b"]}, compute), first)
    assert len(calls) == 3


class _MCLIPTrainer(XCLIPTrainer):
    """A minimal subclass: the model's own contrastive loss on tokenized captions and fixed image vectors."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs, return_loss=True)
        return (out.loss, out) if return_outputs else out.loss


def test_trainer_writes_run_identity_evaluates_per_language_and_refuses_a_foreign_resume(tmp_path, monkeypatch):
    model, processor = build_tiny_model("m-clip", vision=False)
    loaded = load_languages(data_args(languages=["en", "de"]), "validation")
    torch.manual_seed(0)
    image_vectors = {image_id: torch.randn(model.config.numDims) for image_id in loaded["en"]["image_id"]}

    def collate(rows):
        batch = processor(text=[row["caption"] for row in rows])
        batch["image_embeds"] = torch.stack([image_vectors[row["image_id"]] for row in rows])
        return batch

    rows = [loaded[language][i] for language in loaded for i in range(len(loaded[language]))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                             save_steps=2, report_to=[], use_cpu=True, learning_rate=1e-3)
    evaluator = RetrievalEvaluator(loaded, processor, lambda m: image_vectors)
    trainer = _MCLIPTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                            run_info={"stage": "test", "model": "tiny"}, evaluator=evaluator)
    trainer.train()
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / RUN_FILE).read_text())
    assert saved == {"stage": "test", "model": "tiny"}

    metrics = trainer.evaluate()
    assert {"eval_en_t2i_R@1", "eval_de_i2t_R@10", "eval_avg_r1_mean", "eval_std_t2i_R@1"} <= set(metrics)
    assert 0 <= metrics["eval_avg_t2i_R@1"] <= 100 and set(trainer.last_evaluation) == {"en", "de"}

    foreign = _MCLIPTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                            run_info={"stage": "other", "model": "tiny"})
    with pytest.raises(ValueError, match="from another run"):
        foreign.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))

    results = results_record(trainer.last_evaluation, "tiny", "synthetic", "validation")
    card = save_model_card(tmp_path, "model_card.md", model_name="tiny-test", results=results, languages=["en", "de"],
                           method="test", method_summary="A test.", script="test", family="m-clip",
                           base_models={"text": "tiny"}, trainable=model.trainable_parameters(),
                           data_summary="synthetic", hyperparameters={"learning_rate": 1e-3}, repo_id="user/tiny-test")
    text = (tmp_path / "README.md").read_text()
    assert "model-index:" in text and "dataset_config" not in text and "config: de" in text
    assert card.data.eval_results[0].metric_value == round(results["per_language"]["en"]["t2i"]["R@1"], 2)
    assert "| learning_rate | `0.001` |" in text and "trust_remote_code=True" in text

    # finish: the model (remote code, safetensors), its processor, results and card; --push_to_hub uploads the output
    # directory without its checkpoints (huggingface_hub's upload replaced by a local fake that lists the files)
    import fnmatch

    import huggingface_hub
    from transformers import AutoModel

    uploads = []

    def fake_upload(repo_id, folder_path, ignore_patterns=(), allow_patterns=None, **kwargs):
        files = [str(p.relative_to(folder_path)) for p in sorted(Path(folder_path).rglob("*")) if p.is_file()]
        uploads.append((repo_id, [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in ignore_patterns)
                                  and (allow_patterns is None or any(fnmatch.fnmatch(f, p) for p in allow_patterns))]))

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: repo_id)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload)
    trainer.args.hub_model_id = "user/tiny-test"
    card_fields = dict(model_name="tiny-test", languages=["en", "de"], method="test", method_summary="A test.",
                       script="test", family="m-clip", base_models={"text": "tiny"},
                       trainable=model.trainable_parameters(), data_summary="synthetic", hyperparameters={},
                       repo_id="user/tiny-test", template="model_card.md")
    card_fields["base_models"] = {"text": str(tmp_path / "base")}             # local paths, as a run has them
    finish(trainer, processor, tmp_path / "run", card_fields, {**results, "model": str(tmp_path / "run")},
           push_to_hub=True)
    (repo, files), = uploads
    assert repo == "user/tiny-test" and not [f for f in files if f.startswith("checkpoint-")]
    # nothing uploaded names a path of this machine
    leaks = [f for f in files if str(tmp_path) in (tmp_path / "run" / f).read_bytes().decode("utf-8", "replace")]
    assert not leaks, leaks
    assert {"config.json", "model.safetensors", "modeling_xclip.py", "losses.py", "README.md", "results.json",
            "tokenizer.json"} <= set(files)
    assert type(AutoModel.from_pretrained(tmp_path / "run", trust_remote_code=True)).__name__ == "MCLIPModel"
