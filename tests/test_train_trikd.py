"""TriKD (run_trikd.py, TriKDTrainer): frozen towers encoded once give the loss the towers give, bad input fails before
any training step, and an interrupted run resumed from its checkpoint ends with the weights of an uninterrupted one."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments, set_seed

from modeling_xclip import XMCLIPModel
from training_scripts import embedded, run_trikd
from training_scripts.contrastive import Rows, TriKDTrainer, caption_rows, images_of, trikd_collator
from training_scripts.embeddings import Encoder
from training_scripts.training import RUN_FILE, DataArguments, load_languages

SYNTHETIC = ["num_images=60"]
TINY_CLIP = dict(embedded.CLIP_RECIPE, hidden=32, projection_dim=16, epochs=1, batch_size=16)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A random small English CLIP and the word-level random MTE of a 60-image synthetic world (dirs)."""
    root = tmp_path_factory.mktemp("towers")
    english = load_languages(DataArguments(dataset_options=SYNTHETIC, languages=["en"]), "train")["en"]
    model, processor = embedded.small_clip(english["caption"], TINY_CLIP)
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return {"clip": str(root / "clip"), "text": str(embedded.embedded_mte(root, SYNTHETIC))}


def _args(towers, output_dir, *extra):
    return ["--clip", towers["clip"], "--text", towers["text"], "--dataset_options", *SYNTHETIC,
            "--output_dir", str(output_dir), "--per_device_train_batch_size", "16", "--num_train_epochs", "1",
            "--feature_cache_dir", str(output_dir.parent / "features"), "--test_split", "none", *extra]


def test_cached_and_uncached_trikd_steps_give_the_same_loss(towers, tmp_path):
    data_args = DataArguments(dataset_options=SYNTHETIC, languages=["en", "de"], feature_cache_dir=str(tmp_path))
    train = load_languages(data_args, "train")
    model = XMCLIPModel.from_pretrained_towers(text=towers["text"], clip=towers["clip"]).eval()   # no dropout
    model.freeze("trikd")
    tokenizer = AutoTokenizer.from_pretrained(towers["text"])
    clip_encoder = Encoder(towers["clip"], cache_dir=tmp_path)
    rows = caption_rows(train, tokenizer, images_of(train)[1], clip_tokenizer=clip_encoder.tokenizer)
    trainer = TriKDTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none"),
                           train_dataset=Rows(rows))
    batch_rows = rows[:6] + rows[-6:]                                  # English and German rows
    losses = {}
    for name, kwargs in {"cached": dict(cache_mte_states=True), "towers": dict(frozen_features=False)}.items():
        collator = trikd_collator(model, train, rows, clip_encoder, data_args, tokenizer, **kwargs)
        batch = collator(batch_rows)
        assert batch["english_mask"].tolist() == [True] * 6 + [False] * 6
        assert ("pixel_values" in batch) == (name == "towers") and ("mte_hidden_states" in batch) == (name == "cached")
        losses[name] = trainer.compute_loss(model, batch)
    torch.testing.assert_close(losses["cached"], losses["towers"], atol=1e-5, rtol=0)
    # TTC takes part: dropping the English side changes the loss
    itc_only = trikd_collator(model, train, rows, clip_encoder, data_args, tokenizer)(batch_rows)
    itc_only.pop("clip_text_embeds")
    assert abs(trainer.compute_loss(model, itc_only).item() - losses["cached"].item()) > 1e-4


def test_bad_input_fails_before_training(towers, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--languages xx: dataset 'synthetic' has no such language"):
        run_trikd._main(_args(towers, tmp_path / "a", "--languages", "en", "xx"))
    with pytest.raises(ValueError, match="TTC needs English captions"):
        run_trikd._main(_args(towers, tmp_path / "a", "--languages", "de", "fr"))
    with pytest.raises(ValueError, match=r"\(en\) has no image pixels for TriKD"):
        run_trikd._main(_args(towers, tmp_path / "a", "--dataset", "multi30k", "--dataset_options", "variant=task1",
                              "--data_dir", "tests/fixtures/multi30k", "--languages", "en", "de"))
    foreign = tmp_path / "checkpoint-3"
    foreign.mkdir()
    (foreign / RUN_FILE).write_text(json.dumps({"stage": "contrastive", "model": "x"}))
    with pytest.raises(ValueError, match="is from another run"):
        run_trikd._main(_args(towers, tmp_path / "b", "--resume_from_checkpoint", str(foreign)))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run_trikd._main(_args(towers, tmp_path / "c"))


class _Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(towers, tmp_path, monkeypatch):
    common = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "3",
              "--languages", "en", "de", "--learning_rate", "5e-3")
    run_trikd._main(_args(towers, tmp_path / "full", *common))

    class GoDown(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise _Interrupted   # the machine goes down right after checkpoint-3 is written

    class Interrupting(run_trikd.TriKDTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(GoDown)

    monkeypatch.setattr(run_trikd, "TriKDTrainer", Interrupting)
    with pytest.raises(_Interrupted):
        run_trikd._main(_args(towers, tmp_path / "cut", *common))
    monkeypatch.undo()
    assert (tmp_path / "cut" / "checkpoint-3" / RUN_FILE).is_file()
    run_trikd._main(_args(towers, tmp_path / "cut", *common, "--resume_from_checkpoint",
                          str(tmp_path / "cut" / "checkpoint-3")))
    expected, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "cut"))
    assert expected.keys() == resumed.keys()
    set_seed(42)    # the run's seed: the projectors' initialisation
    start = XMCLIPModel.from_pretrained_towers(text=towers["text"], clip=towers["clip"]).state_dict()
    assert not torch.equal(expected["x_projection.weight"], start["x_projection.weight"])   # it trained
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-5, rtol=0, msg=name)
