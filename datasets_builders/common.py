"""What every caption builder shares: the row schema, language and variant checks, cache keys,
reading the source files, images and precomputed image features."""

from __future__ import annotations

import contextlib
import gzip
import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import datasets
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.fingerprint import Hasher

logger = logging.getLogger(__name__)

COCO_SUBSET = re.compile(r"COCO_(train2014|val2014)_")


@dataclass
class CaptionConfig(datasets.BuilderConfig):
    """A language (the config name) and the options every builder takes.

    variant: which view of the source (the builder's VARIANTS; None: the first one).
    image_features: a Parquet file with columns `image_id` and `image_embeds` (list of floats);
        when set, every row gets that image's `image_embeds`.
    """

    version: Optional[Union[datasets.Version, str]] = datasets.Version("1.0.0")
    variant: Optional[str] = None
    image_features: Optional[str] = None


@dataclass
class SourceConfig(CaptionConfig):
    """Options of builders that read a published release (`data_dir`, or a download when None).

    images_dir: the images (flat, or in the COCO `train2014/` and `val2014/` folders); when set,
        rows get `image_path` (relative to images_dir) and an `image` column.
    on_bad_image: "error" (default) or "skip": what a missing, unreadable or truncated image does.
    """

    images_dir: Optional[str] = None
    on_bad_image: str = "error"


class CaptionBuilder(datasets.GeneratorBasedBuilder):
    """Rows `image_id`, `image_path`, [`image`], `caption`, `language`, `split`, extras, [`image_embeds`].

    The config name is the language. Subclasses set BUILDER_CONFIGS (one per language),
    VARIANTS (the first is the default), the card metadata, and implement `_languages`,
    `_split_rows`, `_examples` and, when they have extra columns, `_extra_features`
    (`SourceBuilder` implements `_split_rows` and `_examples` for the published releases).
    """

    BUILDER_CONFIG_CLASS = CaptionConfig
    VARIANTS: tuple[str, ...] = ("default",)
    LANGUAGE_ALIASES: dict[str, str] = {}
    PRETTY_NAME = HOMEPAGE = CITATION = ""
    LICENSE = "other"  # a Hugging Face licence id; for "other", LICENSE_LINK gives the terms
    LICENSE_LINK = ""

    def __init__(self, *args, config_name: Optional[str] = None, **kwargs):
        config_name = self.LANGUAGE_ALIASES.get(config_name, config_name)
        if config_name is not None:
            valid = self.languages(kwargs.get("variant"))
            if config_name not in valid:
                raise ValueError(
                    f"Unknown language {config_name!r} for {type(self).__name__}"
                    f" (variant {self.variant_name(kwargs.get('variant'))!r}); valid languages: {', '.join(valid)}"
                )
            kwargs.setdefault("hash", self._fingerprint(config_name, kwargs))
        super().__init__(*args, config_name=config_name, **kwargs)

    @classmethod
    def variant_name(cls, variant: Optional[str]) -> str:
        if variant is None:
            return cls.VARIANTS[0]
        if variant not in cls.VARIANTS:
            raise ValueError(f"Unknown variant {variant!r} for {cls.__name__}; valid variants: {', '.join(cls.VARIANTS)}")
        return variant

    @classmethod
    def languages(cls, variant: Optional[str] = None) -> list[str]:
        """ISO 639-1 codes this variant has, in the source's order."""
        return cls._languages(cls.variant_name(variant))

    @classmethod
    def _languages(cls, variant: str) -> list[str]:
        raise NotImplementedError

    @classmethod
    def source_files(cls, language: str, variant: Optional[str] = None) -> list[str]:
        """Paths, relative to `data_dir` (or the release's base URL), that this config reads."""
        return []

    def _fingerprint(self, language: str, kwargs: dict) -> str:
        """Cache key beyond the config id: this package's code, the size and time of the local inputs, and the
        names, sizes and times of the files under images_dir, so that editing the code or replacing a source file or
        an image never serves a stale cache."""
        code = [inspect.getsource(sys.modules[c.__module__]) for c in type(self).__mro__ if c.__module__.startswith(__package__)]
        data_dir = kwargs.get("data_dir")
        inputs = [os.path.join(data_dir, p) for p in self.source_files(language, kwargs.get("variant"))] if data_dir else []
        inputs += [kwargs["image_features"]] if kwargs.get("image_features") else []
        stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in inputs if os.path.isfile(p)]
        images = file_stats(kwargs["images_dir"]) if kwargs.get("images_dir") else []
        return Hasher.hash([code, stats, images])

    @property
    def variant(self) -> str:
        return self.variant_name(self.config.variant)

    def _has_pixels(self) -> bool:
        return False

    def _extra_features(self) -> dict:
        return {}

    def _description(self) -> str:
        """The builder module's docstring (the dataset) and the builder's own (its variants)."""
        docs = [sys.modules[type(self).__module__].__doc__, type(self).__dict__.get("__doc__")]
        return "\n\n".join(inspect.cleandoc(doc) for doc in docs if doc)

    def _info(self) -> datasets.DatasetInfo:
        string = datasets.Value("string")
        features = {"image_id": string, "image_path": string}
        if self._has_pixels():
            features["image"] = datasets.Image()
        features |= {"caption": string, "language": string, "split": string, **self._extra_features()}
        if self.config.image_features:
            features["image_embeds"] = datasets.List(datasets.Value("float32"))
        return datasets.DatasetInfo(
            description=self._description(),
            features=datasets.Features(features),
            homepage=self.HOMEPAGE,
            license=" ".join(filter(None, [self.LICENSE, self.LICENSE_LINK])),
            citation=self.CITATION,
        )

    def _split_rows(self, dl_manager) -> dict[str, Sequence]:
        """{split: what `_examples` turns into its rows}. Problems with the source files are raised
        here, before anything is written."""
        raise NotImplementedError

    def _examples(self, split: str, rows: Sequence) -> Iterator[dict]:
        """The rows of a split, with every column but `image_embeds`."""
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        embeds = read_image_features(self.config.image_features) if self.config.image_features else None
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"split": split, "rows": rows, "embeds": embeds})
            for split, rows in self._split_rows(dl_manager).items()
        ]

    def _generate_examples(self, split: str, rows: Sequence, embeds: Optional[dict]) -> Iterator[tuple[int, dict]]:
        for key, row in enumerate(self._examples(split, rows)):
            if embeds is not None:
                if row["image_id"] not in embeds:
                    raise ValueError(f"{self.config.image_features} has no image_embeds for image_id {row['image_id']!r}")
                row = {**row, "image_embeds": embeds[row["image_id"]]}
            yield key, row


class SourceBuilder(CaptionBuilder):
    """A builder for a published release: `source_files` from `data_dir`, or downloaded from BASE_URL;
    subclasses implement `source_files` and `_read_splits`."""

    BUILDER_CONFIG_CLASS = SourceConfig
    BASE_URL = ""

    def _has_pixels(self) -> bool:
        return self.config.images_dir is not None

    def _fetch(self, dl_manager) -> dict[str, str]:
        """{relative path: local path} of `source_files`, checked to exist."""
        relative = self.source_files(self.config.name, self.config.variant)
        if self.config.data_dir is None:
            return dl_manager.download({p: self.BASE_URL + p for p in relative})
        paths = {p: os.path.join(self.config.data_dir, p) for p in relative}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{self.PRETTY_NAME} file(s) missing: {', '.join(missing)} "
                f"(data_dir must have the layout of {self.HOMEPAGE})"
            )
        return paths

    def _read_splits(self, paths: dict[str, str]) -> dict[str, list[dict]]:
        """{split: rows with image_id, caption, language, split and the extra columns} from the fetched files."""
        raise NotImplementedError

    def _split_rows(self, dl_manager) -> dict[str, list[dict]]:
        if self.config.on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', not {self.config.on_bad_image!r}")
        return self._read_splits(self._fetch(dl_manager))

    def _examples(self, split: str, rows: list[dict]) -> Iterator[dict]:
        """The rows with `image_path` (relative to images_dir, so that nothing exported names a local folder) and
        `image`; a bad image raises, or with on_bad_image="skip" leaves its rows out with a warning."""
        problems: dict[str, Optional[str]] = {}  # per image path, checked once
        for row in rows:
            if self.config.images_dir is None:
                yield {**row, "image_path": None}
                continue
            path = find_image(self.config.images_dir, row["image_id"])
            if path not in problems:
                problems[path] = image_problem(path)
                if problems[path] and self.config.on_bad_image == "error":
                    raise ValueError(problems[path] + ' (pass on_bad_image="skip" to leave its rows out)')
                if problems[path]:
                    logger.warning("Skipping the rows of image %s: %s", row["image_id"], problems[path])
            if not problems[path]:
                yield {**row, "image_path": os.path.relpath(path, self.config.images_dir), "image": path}


@contextlib.contextmanager
def quiet_progress():
    """datasets' progress bars off while a config is prepared (it shows one per split, three per language for most
    datasets, which bury the caller's own progress); restored afterwards."""
    if datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, gzipped or not, without line endings (LF or CRLF);
    a missing final newline is fine. A line that is not UTF-8 raises, naming file and line."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    decoded = []
    for number, line in enumerate(lines, 1):
        try:
            decoded.append(line.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    return decoded


def held_out_size(count: int, fraction: float, what: str) -> int:
    """Size of each held-out split (validation, and test or train) drawn from `count` items: `fraction` of them, at
    least one, so that every split of three has an item; `what` names the count in the error."""
    if count < 3:
        raise ValueError(f"{what} must be at least 3 (one per split), not {count}")
    return max(1, round(fraction * count))


def check_counts(path: str, lines: list, expected: int, expected_from: str) -> None:
    if len(lines) != expected:
        raise ValueError(f"{path} has {len(lines)} lines but {expected_from} has {expected}: they must align line by line")


def find_image(images_dir: str, image_id: str) -> str:
    """images_dir/image_id, or images_dir/train2014|val2014/image_id for COCO 2014 names when that exists."""
    flat = os.path.join(images_dir, image_id)
    subset = COCO_SUBSET.match(image_id)
    if subset and not os.path.exists(flat):
        return os.path.join(images_dir, subset.group(1), image_id)
    return flat


def file_stats(folder: str) -> list[tuple[str, int, int]]:
    """(path relative to folder, size, mtime in ns) of every file under folder, sorted; [] for a missing folder."""
    stats = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            info = os.stat(os.path.join(root, name))
            stats.append((os.path.relpath(os.path.join(root, name), folder), info.st_size, info.st_mtime_ns))
    return stats


def image_problem(path: str) -> Optional[str]:
    """Why the image cannot be used (missing, not an image Pillow can read, or truncated), or None.

    The image is decoded fully: `PIL.Image.verify` reads the headers only and passes a truncated JPEG.
    """
    if not os.path.isfile(path):
        return f"image {path} not found"
    try:
        with PIL.Image.open(path) as image:
            image.load()
    except Exception as error:  # Pillow raises many types for broken files
        return f"image {path} is unreadable: {error}"
    return None


def read_image_features(path: str) -> dict[str, list[float]]:
    """{image_id: embedding} from a Parquet file with columns image_id and image_embeds, all of one length."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image features file {path} not found")
    try:
        columns = pq.read_schema(path).names
    except pa.ArrowException as error:
        raise ValueError(f"{path}: not a Parquet file ({error})") from None
    if not {"image_id", "image_embeds"} <= set(columns):
        raise ValueError(f"{path} needs columns image_id and image_embeds; it has {columns}")
    table = pq.read_table(path, columns=["image_id", "image_embeds"])
    features = dict(zip(table.column("image_id").to_pylist(), table.column("image_embeds").to_pylist()))
    lengths = {}
    for image_id, embeds in features.items():
        lengths.setdefault(len(embeds or ()), image_id)
    if len(lengths) > 1:
        examples = ", ".join(f"{length} for image_id {image_id!r}" for length, image_id in lengths.items())
        raise ValueError(f"{path}: image_embeds differ in length ({examples})")
    return features
