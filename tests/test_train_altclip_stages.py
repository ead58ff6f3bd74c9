"""AltCLIP end to end on the synthetic world (issue 7): stage 1, teacher learning (run_teacher_learning.py), then
stage 2, contrastive learning with the image tower frozen (run_contrastive.py), from the main job's embedded towers:
the English CLIP (teacher, text_projection and image tower) and the word-level multilingual encoder (student)."""
import json

from test_train_teacher import synthetic_parallel
from datasets_builders import load
from training_scripts import embedded, run_contrastive, run_eval, run_teacher_learning
from training_scripts.metrics import chance_recall_at_1

# the embedded CLIP's world: its test split (200 images) is unseen by the CLIP and by both stages
OPTIONS = embedded.SYNTHETIC_OPTIONS
NUM_IMAGES = int(dict(option.split("=") for option in OPTIONS)["num_images"])
LANGUAGES = ["en", "de", "fr", "es", "it", "pl", "ru", "zh", "ja", "ko"]


def t2i_r1(model_dir, output_dir):
    """Per-language text->image R@1 of a saved model on the synthetic test split, through xclip-eval."""
    run_eval.main(["--model", str(model_dir), "--dataset", "synthetic", "--dataset_options", *OPTIONS,
                   "--split", "test", "--output_dir", str(output_dir)])
    results = json.loads((output_dir / "results.json").read_text())
    assert results["languages"] == LANGUAGES
    return {language: metrics["t2i"]["R@1"] for language, metrics in results["per_language"].items()}


def chance_t2i_r1(language):
    """R@1 of a random ranking: each caption against its language's test images, positives by concept."""
    ds = load("synthetic", language, split="test", num_images=NUM_IMAGES)
    gallery = dict(zip(ds["image_id"], ds["concept"]))
    keys = {concept: i for i, concept in enumerate(dict.fromkeys(gallery.values()))}
    return chance_recall_at_1([keys[c] for c in ds["concept"]], [keys[c] for c in gallery.values()])


def test_altclip_stage1_then_stage2_retrieves_images_in_every_language(tmp_path):
    clip, mte = str(embedded.embedded_clip()), str(embedded.embedded_mte())   # cached once, shared with the main job
    pairs = synthetic_parallel(tmp_path / "pairs", NUM_IMAGES)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    # stage 1: the student regresses CLIP's pooled text state of the English side (EN-EN and EN-X train pairs)
    run_teacher_learning._main([
        "--model_family", "altclip", "--student", mte, "--teacher", clip, "--teacher_pooling", "clip", "--clip", clip,
        "--dataset", str(pairs), "--output_dir", str(stage1), "--feature_cache_dir", "none",
        "--per_device_train_batch_size", "64", "--learning_rate", "3e-4", "--warmup_steps", "0", "--weight_decay", "0",
        "--num_train_epochs", "6", "--dropout", "0", "--save_strategy", "no", "--report_to", "none", "--seed", "0"])
    # stage 2: image-caption contrastive learning of every language's train split, image tower frozen (cached)
    run_contrastive._main([
        "--model", str(stage1), "--dataset", "synthetic", "--dataset_options", *OPTIONS, "--output_dir", str(stage2),
        "--feature_cache_dir", str(tmp_path / "features"), "--per_device_train_batch_size", "128",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--num_train_epochs", "2", "--eval_split", "none",
        "--test_split", "none", "--save_strategy", "no", "--seed", "0"])

    chance = {language: chance_t2i_r1(language) for language in LANGUAGES}
    after_stage1 = t2i_r1(stage1, tmp_path / "eval-stage1")   # through CLIP's own text_projection
    after_stage2 = t2i_r1(stage2, tmp_path / "eval-stage2")
    print("\nAltCLIP on the synthetic world, text->image R@1 on the test split (200 unseen images)")
    print("| language | chance | stage 1 | stage 1 + 2 |")
    for language in LANGUAGES:
        print(f"| {language} | {chance[language]:.2f} | {after_stage1[language]:.1f} | {after_stage2[language]:.1f} |")
    mean1, mean2 = (sum(scores.values()) / len(scores) for scores in (after_stage1, after_stage2))
    print(f"| mean | | {mean1:.1f} | {mean2:.1f} |")
    assert all(after_stage2[language] >= 5 * chance[language] for language in LANGUAGES), (after_stage2, chance)
    assert mean2 >= mean1, (after_stage1, after_stage2)
