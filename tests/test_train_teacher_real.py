"""Teacher learning on real weights (slow; needs ../shared): an M-CLIP model made from multilingual-e5-small
(xlmr-me5-small) by distilling the English sentence encoder all-MiniLM-L6-v2 (minilm-l6-en, mean pooling) on
Multi30K parallel pairs (de, fr, cs), judged by text-to-image R@1 on the XTD sample whose "images" are minilm's
embeddings of the English captions (so a perfect student scores 100 and chance is 1%).

Three heads on the same student, printed per language:
- untrained: the random linear map the model starts with;
- least squares: the closed-form fit of the linear map on the frozen student's features and the cached teacher
  vectors of the training rows (far stronger than sentence-transformers' MSE distillation with a random head, which
  leaves retrieval at chance on this data), plain and with the run's ridge;
- ours: run_teacher_learning.py, whose head starts from the ridge fit and which then trains the whole student
  (embeddings fixed, no dropout) on the same rows.
"""
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from datasets_builders import load
from modeling_xclip import MCLIPModel
from training_scripts import run_eval, run_teacher_learning
from training_scripts import teacher_learning as tl
from training_scripts.metrics import retrieval_metrics

XTD_LANGUAGES = ["en", "de", "fr", "es", "it", "ko", "pl", "ru", "tr", "zh", "ja"]
PAIRS_PER_LANGUAGE = 500
TEMPLATE, MAX_LENGTH = "query: {}", 32


def t2i_r1(text_embeds, image_embeds):
    keys = list(range(len(text_embeds)))
    return retrieval_metrics(F.normalize(text_embeds, dim=-1), keys, F.normalize(image_embeds, dim=-1),
                             keys)["t2i"]["R@1"]


@pytest.mark.slow
def test_teacher_learning_beats_the_least_squares_fit_on_real_weights(shared_dir, offline_models, tmp_path):
    student, teacher_dir = str(offline_models("xlmr-me5-small")), str(offline_models("minilm-l6-en"))
    xtd_dir = shared_dir / "data" / "xtd-sample"
    xtd = {language: load("xtd", language, split="test", data_dir=str(xtd_dir)) for language in XTD_LANGUAGES}
    teacher = tl.Teacher.from_pretrained(teacher_dir, "mean")
    image_ids = list(xtd["en"]["image_id"])
    images = teacher.encode(xtd["en"]["caption"])
    pd.DataFrame({"image_id": image_ids, "image_embeds": images.tolist()}).to_parquet(tmp_path / "images.parquet")

    out = tmp_path / "mclip-e5"
    argv = ["--model_family", "m-clip", "--student", student, "--teacher", teacher_dir, "--teacher_pooling", "mean",
            "--dataset", "multi30k", "--data_dir", str(shared_dir / "data" / "multi30k"),
            "--dataset_options", "variant=parallel", "--languages", "de", "fr", "cs",
            "--max_train_samples", str(PAIRS_PER_LANGUAGE), "--text_template", TEMPLATE,
            "--max_length", str(MAX_LENGTH), "--freeze_embeddings", "--dropout", "0", "--output_dir", str(out),
            "--learning_rate", "2e-4", "--warmup_steps", "6", "--weight_decay", "0", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "32", "--save_strategy", "no", "--logging_steps", "10",
            "--report_to", "none", "--seed", "0"]
    trainer = run_teacher_learning._main(argv)
    assert trainer.state.global_step == -(-4 * PAIRS_PER_LANGUAGE // 32)  # EN-EN + 3 languages, one epoch

    # ours: the saved model through the evaluation command
    run_eval.main(["--model", str(out), "--dataset", "xtd", "--data_dir", str(xtd_dir), "--image_features",
                   str(tmp_path / "images.parquet"), "--output_dir", str(tmp_path / "eval")])
    ours = {language: metrics["t2i"]["R@1"] for language, metrics in
            json.loads((tmp_path / "eval" / "results.json").read_text())["per_language"].items()}

    # the baselines: heads on the frozen student's features of the XTD captions (the same template and truncation)
    model_args, _, _ = run_teacher_learning.parse_args(
        (run_teacher_learning.ModelArguments, run_teacher_learning.TeacherDataArguments,
         run_teacher_learning.TeacherLearningArguments), argv)
    from training_scripts.training import DataArguments, load_languages

    data_args = DataArguments(dataset="multi30k", data_dir=str(shared_dir / "data" / "multi30k"),
                              dataset_options=["variant=parallel"], languages=["de", "fr", "cs"])
    rows, english = tl.build_pairs(load_languages(data_args, "train", max_samples=PAIRS_PER_LANGUAGE))
    cache = data_args.cache_dir  # the run's own cache: the fit below sees exactly the run's features and targets
    tokenizer = AutoTokenizer.from_pretrained(student)
    frozen = MCLIPModel.from_pretrained_towers(text=student, numDims=teacher.width).eval()
    targets = run_teacher_learning.teacher_targets(teacher, english, model_args, cache, 64)
    features = run_teacher_learning.student_pooled_features(frozen, tokenizer, [TEMPLATE.format(r["text"]) for r in rows],
                                                            model_args, cache, 64)
    heads = {"plain": tl.least_squares_head(features, targets[[r["target"] for r in rows]]),
             "ridge": tl.least_squares_head(features, targets[[r["target"] for r in rows]], model_args.head_init_ridge)}
    untrained = frozen.LinearTransformation
    table = {}
    for language, ds in xtd.items():
        assert list(ds["image_id"]) == image_ids
        pooled = run_teacher_learning.student_pooled_features(
            frozen, tokenizer, [TEMPLATE.format(c) for c in ds["caption"]], model_args, None, 64)
        with torch.no_grad():
            table[language] = (t2i_r1(untrained(pooled), images),
                               *(t2i_r1(pooled @ weight.T + bias, images) for weight, bias in heads.values()),
                               ours[language])

    print(f"\nXTD sample ({len(image_ids)} images, chance 1%), t2i R@1 after teacher learning on "
          f"{len(rows)} Multi30K rows:")
    columns = ("untrained", "least sq.", f"ridge {model_args.head_init_ridge:g}", "ours")
    print(f"{'language':>8}" + "".join(f"{c:>12}" for c in columns))
    for language, values in table.items():
        print(f"{language:>8}" + "".join(f"{v:>12.1f}" for v in values))
    means = [sum(column) / len(table) for column in zip(*table.values())]
    print(f"{'mean':>8}" + "".join(f"{v:>12.1f}" for v in means))

    for language, (random_head, fit, ridge_fit, trained) in table.items():
        assert trained > random_head + 20, (language, table[language])
    # ours beats the least-squares fit, plain and with the ridge it starts from, on average and in most languages
    assert means[3] > means[1] + 1.0 and means[3] > means[2], means
    assert sum(trained > fit for _, fit, _, trained in table.values()) > len(table) / 2, table
