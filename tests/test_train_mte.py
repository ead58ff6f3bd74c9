"""MTE enhancement (training_scripts/mte.py, run_mte.py): NMT and stage-2 losses against their formulas, the
encoder-decoder, what each stage trains, both stages end to end on tiny models, and bad input."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, TrainingArguments, XLMRobertaModel

from modeling_xclip import XMCLIPModel
from modeling_xclip.losses import mean_pool, mte_stage2_loss, nmt_loss
from modeling_xclip.tiny import tiny_text_config, tiny_tokenizer
from training_scripts import mte, run_mte

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO / "tests" / "fixtures" / "multi30k"


# --- losses -------------------------------------------------------------------------------------------------------
def test_nmt_loss_sums_token_log_likelihoods_per_sentence_and_averages_sentences():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = -100  # padding
    labels[2, 1:] = -100
    expected = 0.0
    for i in range(3):
        for t in range(5):
            if labels[i, t] != -100:
                expected -= math.log(math.exp(logits[i, t, labels[i, t]]) / sum(math.exp(v) for v in logits[i, t]))
    assert nmt_loss(logits, labels).item() == pytest.approx(expected / 3, rel=1e-5)


def test_stage2_loss_is_nmt_plus_twice_the_symmetric_contrastive_loss_of_mean_pooled_states():
    torch.manual_seed(0)
    source, target = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    source_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 2 + [0] * 4])
    target_mask = torch.tensor([[1] * 4 + [0] * 2, [1] * 6, [1] * 1 + [0] * 5, [1] * 3 + [0] * 3])
    tau, nmt = 0.07, torch.tensor(3.5)

    def pooled(states, mask):  # the average of the attended tokens, written out
        return torch.stack([states[i, :int(mask[i].sum())].mean(0) for i in range(len(states))])

    h_s, h_o = (F.normalize(pooled(source, source_mask), dim=-1), F.normalize(pooled(target, target_mask), dim=-1))

    def ell(x, y):  # seed 002 eq. 1
        return -sum(math.log(math.exp(x[i] @ y[i] / tau) / sum(math.exp(x[i] @ y[j] / tau) for j in range(4)))
                    for i in range(4)) / 4

    expected = nmt.item() + 2.0 * 0.5 * (ell(h_s, h_o) + ell(h_o, h_s))
    loss = mte_stage2_loss(nmt, mean_pool(source, source_mask), mean_pool(target, target_mask), temperature=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- the model and the data -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mte") / "encoder"
    torch.manual_seed(0)
    XLMRobertaModel(tiny_text_config(len(tiny_tokenizer())), add_pooling_layer=False).save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    return root


def test_encoder_decoder_shares_fixed_embeddings_and_each_stage_trains_its_part(encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = mte.build_encoder_decoder(str(encoder_dir), tokenizer, decoder_layers=1)
    encoder = AutoModel.from_pretrained(encoder_dir)
    embeddings = encoder.embeddings.word_embeddings.weight
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, embeddings)
    assert torch.equal(model.decoder.get_input_embeddings().weight, embeddings)
    assert model.decoder.get_output_embeddings().weight is model.decoder.get_input_embeddings().weight
    assert torch.equal(model.decoder.base_model.embeddings.position_embeddings.weight,
                       encoder.embeddings.position_embeddings.weight)
    assert model.decoder.config.num_hidden_layers == 1 and model.decoder.config.add_cross_attention
    trainable = {1: None, 2: None}
    for stage in (1, 2):
        mte.freeze(model, stage)
        trainable[stage] = {n for n, p in model.named_parameters() if p.requires_grad}
        assert not any("embeddings" in n for n in trainable[stage])
        assert any(n.startswith("decoder.") and "crossattention" in n for n in trainable[stage])
    assert not any(n.startswith("encoder.") for n in trainable[1])
    assert any(n.startswith("encoder.encoder.layer.") for n in trainable[2])
    with pytest.raises(ValueError, match="stage"):
        mte.freeze(model, 3)


def test_collator_translates_both_ways_and_the_trainer_loss_is_the_formula(encoder_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    torch.manual_seed(0)
    model = mte.build_encoder_decoder(str(encoder_dir), tokenizer, decoder_layers=1).eval()
    rows = [{"source": "a red circle", "target": "ein roter Kreis"}, {"source": "a dog", "target": "un chien"}]
    batch = mte.MTECollator(tokenizer, 32)(rows)
    encoded = tokenizer(["a red circle", "a dog", "ein roter Kreis", "un chien"], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], encoded["input_ids"])
    # the decoder predicts the targets, then the sources; its inputs are the labels shifted right after <s>
    expected = encoded["input_ids"][[2, 3, 0, 1]].masked_fill(encoded["attention_mask"][[2, 3, 0, 1]] == 0, -100)
    assert torch.equal(batch["labels"], expected)
    assert (batch["decoder_input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:][batch["labels"][:, :-1] != -100],
                       batch["labels"][:, :-1][batch["labels"][:, :-1] != -100])
    trainer = mte.MTETrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                             stage=2, data_collator=mte.MTECollator(tokenizer, 32))
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=batch["decoder_input_ids"],
                    decoder_attention_mask=batch["decoder_attention_mask"])
        log_probs = out.logits.log_softmax(-1)
        valid = batch["labels"] != -100
        nmt = -log_probs.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid].sum() / 4
        states = out.encoder_last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        pooled = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
        logits = pooled[:2] @ pooled[2:].T / 0.07
        ctl = (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))) / 2
    assert loss.item() == pytest.approx((nmt + 2.0 * ctl).item(), rel=1e-5)


# --- the script -----------------------------------------------------------------------------------------------------
def argv(stage, model, output_dir, *extra):
    return ["--stage", str(stage), "--model", str(model), "--dataset", "multi30k", "--data_dir", str(MULTI30K),
            "--dataset_options", "variant=parallel", "--languages", "de", "fr", "cs", "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "3", "--num_train_epochs", "4", "--learning_rate", "3e-3",
            "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--decoder_layers", "1", "--dropout", "0",
            "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none", *map(str, extra)]


def test_both_stages_train_their_part_and_save_an_encoder_trikd_accepts(encoder_dir, tmp_path):
    original = load_file(str(encoder_dir / "model.safetensors"))
    first = run_mte._main(argv(1, encoder_dir, tmp_path / "stage1"))
    losses = [e["loss"] for e in first.state.log_history if "loss" in e]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # the decoder learns to translate
    stage1 = load_file(str(tmp_path / "stage1" / "model.safetensors"))
    assert all(torch.equal(stage1[k], original[k]) for k in stage1)  # stage 1 leaves the encoder as it was

    second = run_mte._main(argv(2, tmp_path / "stage1", tmp_path / "mte"))
    assert second.state.global_step == 12
    enhanced = load_file(str(tmp_path / "mte" / "model.safetensors"))
    changed = [k for k in enhanced if not torch.equal(enhanced[k], original[k])]
    assert any(k.startswith("encoder.layer.") for k in changed)
    assert not any("embeddings" in k for k in changed)  # embeddings stay fixed
    # a plain XLM-R encoder directory with its tokenizer, as run_trikd.py --text reads it
    assert AutoConfig.from_pretrained(tmp_path / "mte").model_type == "xlm-roberta"
    encoder = AutoModel.from_pretrained(tmp_path / "mte")
    assert torch.equal(encoder.encoder.layer[0].attention.self.query.weight,
                       enhanced["encoder.layer.0.attention.self.query.weight"])
    assert AutoTokenizer.from_pretrained(tmp_path / "mte")("ein Hund")["input_ids"]
    mclip = XMCLIPModel.from_pretrained_towers(text=str(tmp_path / "mte"), x_projector_num_layers=1)
    assert torch.equal(mclip.text_model.encoder.layer[0].attention.self.query.weight,
                       enhanced["encoder.layer.0.attention.self.query.weight"])
    card = (tmp_path / "mte" / "README.md").read_text()
    assert "stage 2 of 2" in card and "NMT + 2.0 x CTL" in card
    assert str(tmp_path) not in card   # the stage-1 model it started from is named, not its directory here
    assert json.loads((tmp_path / "mte" / "encoder_decoder" / "config.json").read_text())["is_encoder_decoder"]


def test_bad_input_is_refused_before_training(encoder_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(mte.MTETrainer, "training_step", lambda *a, **k: pytest.fail("a training step ran"))
    with pytest.raises(ValueError, match="not the output of stage 1"):
        run_mte._main(argv(2, encoder_dir, tmp_path / "out"))
    bad = argv(1, encoder_dir, tmp_path / "out")
    bad[bad.index("variant=parallel")] = "variant=task1"
    with pytest.raises(ValueError, match="lacks column.*source"):
        run_mte._main(bad)
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        run_mte._main(argv(1, encoder_dir, encoder_dir))  # a directory holding a model
