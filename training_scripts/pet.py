"""Per-language PET heads for M-CLIP (seed paper 000): the methods as PEFT configs, their trainable shares, the
translation-based alignment data, the `Trainer` subclass with the eq. 9 loss, and saving, checking and loading the
per-language adapter folders.

Layout of an adapters directory (what `run_pet.py` writes and `xclip-eval --adapters` reads):

    OUT/{lang}/adapter_config.json, adapter_model.safetensors   PEFT's files (none for hard_prompt)
    OUT/{lang}/pet_xclip.json                                  method, hard prompt, alignment, base identity, results

Every method's adapter loads the same way: `PeftModel.from_pretrained(base, OUT, subfolder=lang, adapter_name=lang)`,
then `load_adapter(OUT, adapter_name=other, subfolder=other)` and `set_adapter(other)`.
"""
import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import torch

from modeling_xclip.losses import ALIGNMENT_LOSSES, pet_alignment_loss
from modeling_xclip.pet_xclip import ADAPTER_HOST, COMPACTER_HOST, PHM_DIM
from training_scripts.data import read_table
from training_scripts.embeddings import text_features
from training_scripts.publish import save_adapter
from training_scripts.training import XCLIPTrainer, save_model_card

logger = logging.getLogger(__name__)

METHODS = ("lora", "adapter", "compacter", "prompt", "hard_prompt", "linear", "full")
ROUTINES = ("none", "routine1", "routine2", "routine3")
PET_FILE = "pet_xclip.json"
PIVOT = "en"
# seed paper 000 §3.2 / §5.4.2: the share of the text encoder each method adds (its own parameters; the linear head
# and the LayerNorms, which also train, are counted apart)
PAPER_SHARE = {"lora": 0.16, "adapter": 0.45, "compacter": 0.05}
# Appendix A: learning rates of PET methods and of full fine-tuning
DEFAULT_LEARNING_RATE = {"full": 1e-5}
PET_LEARNING_RATE = 1e-4
# what else trains, per language, with Adapter, Compacter and LoRA (§3.2): the linear head and the LayerNorms
HEAD_AND_NORMS = ["LinearTransformation", "LayerNorm"]
# routine -> the translation column it needs (routine 2: English translated into the target; routine 3: the target
# translated into English)
ROUTINE_COLUMN = {"routine2": "caption_translated", "routine3": "caption_en"}


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown PET method {method!r}; valid: {list(METHODS)}")


def check_alignment(routine, loss):
    if routine not in ROUTINES:
        raise ValueError(f"unknown alignment routine {routine!r}; valid: {list(ROUTINES)}")
    if loss not in ALIGNMENT_LOSSES:
        raise ValueError(f"unknown alignment loss {loss!r}; valid: {list(ALIGNMENT_LOSSES)}")


def check_template(template, where="--hard_prompt"):
    if template.count("{}") != 1:
        raise ValueError(f"{where}: the hard prompt {template!r} needs exactly one {{}} where the caption goes")
    return template


def hard_prompts(value, languages):
    """{language: template} from a template for every language, or a JSON file {language: template}."""
    if value is None:
        return {language: "{}" for language in languages}
    if value.endswith(".json"):
        table = json.loads(Path(value).read_text("utf-8"))
        missing = [language for language in languages if language not in table]
        if missing:
            raise ValueError(f"{value}: no hard prompt for languages {missing}")
        return {language: check_template(table[language], f"{value}, language {language!r}") for language in languages}
    check_template(value)
    return {language: value for language in languages}


# --- methods --------------------------------------------------------------------------------------------------------
def default_rank(method, width):
    """LoRA r = 8 (LoRA's default, on W_q and W_v); Houlsby bottleneck 24 (OpenDelta's default, 0.43% of XLM-R large);
    Compacter bottleneck width/16 (reduction factor 16), a multiple of its k."""
    if method == "lora":
        return 8
    if method == "adapter":
        return 24
    return max(PHM_DIM, width // 16 // PHM_DIM * PHM_DIM)


def peft_config(method, model, rank=None, num_virtual_tokens=None, prompt_init_text=None, tokenizer_path=None):
    """The PEFT config of `method` on an M-CLIP `model` (None for hard_prompt, which has no parameters)."""
    from peft import LNTuningConfig, LoraConfig, PromptTuningConfig

    check_method(method)
    width = model.config.transformerDimensions
    rank = rank or default_rank(method, width)
    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"],
                          modules_to_save=list(HEAD_AND_NORMS))
    if method in ("adapter", "compacter"):
        host = ADAPTER_HOST if method == "adapter" else COMPACTER_HOST
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=rf".*\.{host}", modules_to_save=list(HEAD_AND_NORMS))
    if method == "linear":
        return LNTuningConfig(target_modules=["LinearTransformation"])
    if method == "full":
        # every module of the encoder that holds weights (PEFT's layer wrappers take positional inputs, which the
        # encoder's top-level modules do not get): a per-language copy of the whole text encoder
        from peft.tuners.ln_tuning.layer import LNTuningLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        owners, wrapped = [], []
        for name, module in model.transformer.named_modules():
            if any(name.startswith(prefix) for prefix in wrapped):
                continue  # inside a PEFT layer (another language's copy, or a host)
            if isinstance(module, BaseTunerLayer):
                wrapped.append(f"{name}.")
            if isinstance(module, LNTuningLayer) or next(module.parameters(recurse=False), None) is not None:
                owners.append(f"transformer.{name}")
        return LNTuningConfig(target_modules=owners + ["LinearTransformation"])
    if method == "prompt":
        text = model.config.text_config
        if prompt_init_text and num_virtual_tokens is None:  # one virtual token per token of the text (3 for "a photo of")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            num_virtual_tokens = len(tokenizer(prompt_init_text, add_special_tokens=False)["input_ids"])
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": prompt_init_text,
                "tokenizer_name_or_path": tokenizer_path} if prompt_init_text else {"prompt_tuning_init": "RANDOM"}
        return PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=num_virtual_tokens or 3,
                                  token_dim=width, num_transformer_submodules=1,
                                  num_attention_heads=text.num_attention_heads, num_layers=text.num_hidden_layers,
                                  **init)
    return None


def add_pet(model, method, language, **kwargs):
    """`model` (an M-CLIP model, or a PeftModel of one) with a new trainable adapter `language` of `method`, active.

    The base is frozen first: M-CLIP carries PEFT layers (the empty Adapter/Compacter hosts), so PEFT would otherwise
    take this for a second injection and leave the base's trainability as it was."""
    from peft import PeftModel, get_peft_model

    config = peft_config(method, model.get_base_model() if isinstance(model, PeftModel) else model, **kwargs)
    if config is None:
        return model
    if isinstance(model, PeftModel):
        model.add_adapter(language, config)
        model.set_adapter(language)
        return model
    for param in model.parameters():
        param.requires_grad = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*modify a model with PEFT for a second time.*")
        return get_peft_model(model, config, adapter_name=language)


def trainable_share(model, method, language="xx"):
    """{"method": share of the text encoder added by the method (%), "trainable": share trained per language
    including the linear head and LayerNorms (%), counts}; `model` is an M-CLIP model (e.g. on the meta device)."""
    encoder = text_encoder_parameters(model)
    peft = add_pet(model, method, language)
    trainable = {name: p.numel() for name, p in peft.named_parameters() if p.requires_grad}
    own = sum(n for name, n in trainable.items()
              if not any(f".{m}." in name or f".{m}.modules_to_save" in name for m in HEAD_AND_NORMS))
    if method in ("linear", "full"):
        own = sum(trainable.values())
    total = sum(trainable.values())
    return {"method_parameters": own, "trainable_parameters": total, "text_encoder_parameters": encoder,
            "method_percent": 100.0 * own / encoder, "trainable_percent": 100.0 * total / encoder}


def meta_mclip(model_base="xlm-roberta-large", num_dims=768):
    """The M-CLIP configuration of seed paper 000 (XLM-R large, text-only) built on the meta device: no weights."""
    from modeling_xclip import MCLIPConfig, MCLIPModel

    with torch.device("meta"):
        return MCLIPModel(MCLIPConfig(modelBase=model_base, numDims=num_dims))


# --- identity of a base, and the adapter folders ------------------------------------------------------------------
def base_identity(model):
    """What an adapter needs of its base: the encoder's type and shape and the joint width."""
    text = model.config.text_config
    return {"model_type": model.config.model_type, "text_model_type": text.model_type,
            "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
            "vocab_size": text.vocab_size, "numDims": model.config.numDims}


def read_pet_file(adapters, language):
    """The pet_xclip.json of `language` in an adapters directory, with clear errors."""
    adapters = Path(adapters)
    path = adapters / language / PET_FILE
    if not path.is_file():
        present = sorted(p.parent.name for p in adapters.glob(f"*/{PET_FILE}"))
        raise FileNotFoundError(f"{adapters} has no adapter for language {language!r} (no {language}/{PET_FILE}); "
                                f"languages there: {present}")
    return json.loads(path.read_text("utf-8"))


def check_base(meta, model, adapters, language):
    expected = base_identity(model)
    trained = meta.get("base", {})
    differ = {key: (trained.get(key), value) for key, value in expected.items() if trained.get(key) != value}
    if differ:
        details = ", ".join(f"{key}: adapter {a!r} vs base {b!r}" for key, (a, b) in differ.items())
        raise ValueError(f"{Path(adapters) / language}: this adapter was trained on another base "
                         f"({meta.get('base_model')}); config mismatch: {details}")


def load_language_adapter(model, adapters, language):
    """Load (once) and activate the adapter of `language` from an adapters directory onto `model` (an M-CLIP model
    or a PeftModel of one). Returns (model, the language's metadata). Checks that the folder exists and that the
    adapter was trained on this base."""
    from peft import PeftModel

    meta = read_pet_file(adapters, language)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    check_base(meta, base, adapters, language)
    if meta["method"] == "hard_prompt":  # no parameters: the template is all there is
        return model, meta
    if not isinstance(model, PeftModel):
        model = PeftModel.from_pretrained(model, str(adapters), subfolder=language, adapter_name=language)
    else:
        if language not in model.peft_config:
            model.load_adapter(str(adapters), adapter_name=language, subfolder=language)
        model.set_adapter(language)
    return model.eval(), meta


# --- data -----------------------------------------------------------------------------------------------------------
def caption_keys(image_ids):
    """(image_id, caption_index) of each row: the index counts the image's captions in dataset order."""
    seen = Counter()
    keys = []
    for image_id in image_ids:
        keys.append((str(image_id), seen[image_id]))
        seen[image_id] += 1
    return keys


def read_translation_column(path, column):
    """{language: {(image_id, caption_index): text}} of one column of a --translations file (the format of
    `xclip-eval --translated_captions`; routine 2 reads `caption_translated`, routine 3 `caption_en`)."""
    table = read_table(path)
    needed = ["language", "image_id", "caption_index", column]
    missing = [name for name in needed if name not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing} (needed: {needed})")
    out = {}
    for line, (language, image_id, index, text) in enumerate(table[needed].itertuples(index=False), start=2):
        if text is None or (isinstance(text, float) and text != text) or text == "":
            raise ValueError(f"{path}, row {line - 1} ({language}, {image_id}, {index}): empty {column}")
        out.setdefault(str(language), {})[str(image_id), int(index)] = str(text)
    return out


def lookup(table, keys, path, language, column):
    if table is None:
        raise ValueError(f"{path}: no {column} rows for language {language!r}")
    missing = [key for key in keys if key not in table]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(keys)} {language!r} captions have no {column}, e.g. "
                         f"(image_id, caption_index) {missing[0]}")
    return [table[key] for key in keys]


def pair_texts(language, target_rows, pivot_rows, routine, translations=None, translations_path=None):
    """(texts, pivots) of a split for `routine` (seed paper 000 §3.1).

    `target_rows`/`pivot_rows` are (image_ids, captions) of the target language and of English on the same images.
    routine1: English ↔ target; routine2: English translated into the target ↔ target; routine3: English ↔ the target
    translated into English (the target side becomes the translation, at training and at test time). English itself,
    and routine "none", have no pivot."""
    image_ids, captions = target_rows
    keys = caption_keys(image_ids)
    if routine == "none" or language == PIVOT:
        return list(captions), None
    if routine in ROUTINE_COLUMN and translations is None:
        raise ValueError(f"--alignment {routine} needs --translations (a file with a {ROUTINE_COLUMN[routine]} "
                         "column)")
    if routine == "routine2":
        return list(captions), lookup(translations.get(language), keys, translations_path, language, "caption_translated")
    english = dict(zip(caption_keys(pivot_rows[0]), pivot_rows[1]))
    missing = [key for key in keys if key not in english]
    if missing:
        raise ValueError(f"{language}: {len(missing)} captions have no English caption of the same image, e.g. "
                         f"(image_id, caption_index) {missing[0]}")
    pivots = [english[key] for key in keys]
    if routine == "routine1":
        return list(captions), pivots
    return lookup(translations.get(language), keys, translations_path, language, "caption_en"), pivots


class PETCollator:
    """Tokenizes the target texts (with the language's hard prompt) and the pivots; gathers the cached image vectors."""

    def __init__(self, tokenizer, image_embeds, template="{}", max_length=None):
        self.tokenizer, self.image_embeds, self.template, self.max_length = tokenizer, image_embeds, template, max_length

    def _tokens(self, texts):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def __call__(self, rows):
        text = self._tokens([self.template.format(row["text"]) for row in rows])
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                 "image_embeds": self.image_embeds[[row["image"] for row in rows]]}
        if rows[0].get("pivot") is not None:
            pivot = self._tokens([row["pivot"] for row in rows])
            batch.update(pivot_input_ids=pivot["input_ids"], pivot_attention_mask=pivot["attention_mask"])
        return batch


# --- training -------------------------------------------------------------------------------------------------------
class PETTrainer(XCLIPTrainer):
    """The loss of seed paper 000 eq. 9, L = L_i2t + L_t2i + λ L_alignment, on cached image vectors (the image tower
    is frozen and never runs). Evaluation, best checkpoint and resume are `XCLIPTrainer`'s."""

    def __init__(self, *args, alignment_loss="mse", alignment_weight=0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.alignment_loss, self.alignment_weight = alignment_loss, alignment_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        text = text_features(model, inputs["input_ids"], inputs["attention_mask"])
        pivot = None
        if "pivot_input_ids" in inputs:
            pivot = text_features(model, inputs["pivot_input_ids"], inputs["pivot_attention_mask"])
        loss = pet_alignment_loss(text, inputs["image_embeds"].to(text.dtype), pivot=pivot, kind=self.alignment_loss,
                                  weight=self.alignment_weight)
        return (loss, {"text_embeds": text}) if return_outputs else loss


def save_language(model, output_dir, language, meta):
    """Write the language's adapter (PEFT's files, if any) and its pet_xclip.json to output_dir/language/.

    The adapter is the one named `language`, else the active one (run_pet trains under PEFT's "default" name, the
    one `Trainer` saves, resumes and reloads as the best checkpoint); PEFT's files do not hold the name."""
    from peft import PeftModel

    folder = Path(output_dir) / language
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        name = language if language in model.peft_config else model.active_adapter
        # PEFT saves an adapter other than "default" into a subfolder named after it, and a generic model card
        # (README.md) into the folder it is given: the adapters directory has one card, written by run_pet
        card = Path(output_dir if name != "default" else folder) / "README.md"
        had_card = card.exists()
        save_adapter(model, card.parent, meta.get("base_model") or model.get_base_model().name_or_path,
                     selected_adapters=[name])
        if not had_card and card.exists():
            card.unlink()
    (folder / PET_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


def adapter_bytes(folder):
    """Disk size of one language's adapter folder, in bytes."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


# --- shares, report, card, publishing -------------------------------------------------------------------------------
def text_encoder_parameters(model):
    return sum(p.numel() for name, p in model.named_parameters()
               if name.split(".")[0] in ("transformer", "LinearTransformation"))


def share_of(model, method):
    """Parameters trained per language by `model` (a PeftModel, or a base for hard_prompt) and their share of the
    text encoder, in percent."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    encoder = text_encoder_parameters(base)
    if not isinstance(model, PeftModel):
        return {"trainable_parameters": 0, "percent": 0.0}
    # full fine-tuning keeps a copy of the encoder per language: count the adapter's own copy, not the base's
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "percent": 100.0 * trainable / encoder}


def total_share(shares, base_model):
    """All languages' trained parameters together, against the full model's."""
    total = sum(share["trainable_parameters"] for share in shares.values())
    full = sum(p.numel() for p in base_model.parameters())
    return {"languages": len(shares), "trainable_parameters": total, "full_model_parameters": full,
            "percent_of_full_model": 100.0 * total / full}


def _row(title, per_language, summary, languages, column="r1_mean"):
    values = [f"{per_language[language][column]:.2f}" for language in languages]
    stats = [summary[column][s] for s in ("avg", "avg_en", "std", "range")]
    return "| " + " | ".join([title, *values, *("–" if v is None else f"{v:.2f}" for v in stats)]) + " |"


def comparison_table(report):
    """Seed paper 000 Table 1: the zero-shot base and the adapters side by side (r1_mean), with the shares."""
    languages = report["languages"]
    header = ["method", *languages, "Avg", "Avg-en", "Std", "Range"]
    lines = ["## Zero-shot base and per-language adapters (r1_mean, split "
             f"`{report['split']}`)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             _row("zero-shot (base)", report["zero_shot"]["per_language"], report["zero_shot"]["summary"], languages),
             _row(report["setup"]["pet_method"], report["per_language"], report["summary"], languages), "",
             "Trainable share per language (% of the text encoder): " + ", ".join(
                 f"{language} {report['shares'][language]['percent']:.3f}%" for language in languages) + ".",
             f"All {report['total_share']['languages']} languages together: "
             f"{report['total_share']['trainable_parameters']:,} parameters, "
             f"{report['total_share']['percent_of_full_model']:.2f}% of the full model "
             f"({report['total_share']['full_model_parameters']:,})."]
    return "\n".join(lines)


def save_card(output_dir, report):
    """OUT/README.md from model_cards/pet_adapters.md: base, method, shares, the Table 1 comparison, the per-language
    results (`model-index`) and how to load a language."""
    languages = report["languages"]
    setup = report["setup"]
    return save_model_card(
        output_dir, "pet_adapters.md", model_name=report["model"], results=report, languages=languages,
        base_model=setup["base_model"], library_name="peft", tags=["m-clip", "peft", setup["pet_method"]],
        method=setup["pet_method"], alignment=setup["alignment"], alignment_loss=setup["alignment_loss"],
        alignment_weight=setup["alignment_weight"], dataset=report["dataset"], table=comparison_table(report),
        first=languages[0], second=languages[-1],
        share=", ".join(f"{language} {report['shares'][language]['percent']:.3f}%" for language in languages))


def upload_patterns(languages):
    """What `--push_to_hub` uploads: the language folders, the card and the results."""
    return [f"{language}/*" for language in languages] + ["README.md", "results.json", "results.md", "results.png"]


def use_language(encoder, adapters, language, translated):
    """Make an evaluation `Encoder` encode `language` with its own adapter; returns the language's hard prompt.

    A routine-3 adapter was trained on captions translated into English: evaluating it without translations is an
    error."""
    encoder.model, meta = load_language_adapter(encoder.model, adapters, language)
    if meta.get("translated_test") and not translated:
        raise ValueError(f"{Path(adapters) / language}: this adapter was trained with alignment routine 3 and reads "
                         f"captions translated into English: pass --translated_captions with {language!r} rows")
    # the embedding cache must tell the languages' adapters apart
    encoder._fingerprint = [encoder._fingerprint, str(Path(adapters).resolve()), language,
                            (Path(adapters) / language / PET_FILE).stat().st_mtime_ns]
    return meta["hard_prompt"]
