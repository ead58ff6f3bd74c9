"""Write an evaluation's results.json, results.md (per-language table, summary rows, conventions) and results.png."""
import json
import logging
from pathlib import Path

from training_scripts.metrics import CLASSIFICATION_CONVENTIONS, RETRIEVAL_CONVENTIONS, SUMMARY_CONVENTIONS, flatten

logger = logging.getLogger(__name__)

RESULT_FILES = ("results.json", "results.md", "results.png")
CONVENTIONS = {"retrieval": RETRIEVAL_CONVENTIONS, "classification": CLASSIFICATION_CONVENTIONS}
HEADLINE = {"retrieval": "r1_mean", "classification": "top1"}
SUMMARY_ROWS = (("Avg", "avg"), ("Avg-en", "avg_en"), ("Std", "std"), ("Range", "range"))


def existing_results(output_dir):
    """The result files already in ``output_dir``."""
    return [Path(output_dir) / name for name in RESULT_FILES if (Path(output_dir) / name).exists()]


def write_results(output_dir, results):
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output_dir / "results.md").write_text(markdown(results), encoding="utf-8")
    plot(results, output_dir / "results.png")
    logger.info("results written to %s", output_dir)


def _number(value):
    return "–" if value is None else f"{value:.2f}"


def markdown(results):
    rows = {language: flatten(metrics) for language, metrics in results["per_language"].items()}
    columns = list(results["summary"])
    size_columns = list(next(iter(results["sizes"].values())))
    header = ["language", *size_columns, *columns]
    splits = (f"split `{results['split']}`" if results["split"] is not None else
              "splits " + ", ".join(f"{language} `{split}`" for language, split in results["splits"].items()))
    lines = [f"# {results['task'].capitalize()}: `{results['model']}` on `{results['dataset']}` ({splits})", ""]
    lines += [f"- {name}: `{value}`" for name, value in results["setup"].items()]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for language, row in rows.items():
        sizes = [str(results["sizes"][language][name]) for name in size_columns]
        lines.append("| " + " | ".join([language, *sizes, *(_number(row[c]) for c in columns)]) + " |")
    for title, stat in SUMMARY_ROWS:
        cells = [f"**{title}**", *[""] * len(size_columns), *(_number(results["summary"][c][stat]) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", CONVENTIONS[results["task"]], "", SUMMARY_CONVENTIONS, ""]
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = HEADLINE[results["task"]]
    languages = list(results["per_language"])
    values = [flatten(results["per_language"][language])[column] for language in languages]
    summary = results["summary"][column]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(languages) + 2), 3.5))
    ax.bar(languages, values, color="tab:blue")
    ax.axhline(summary["avg"], color="tab:red", linestyle="--", label=f"Avg {summary['avg']:.2f}")
    ax.text(0.99, 0.97, f"Std {_number(summary['std'])}   Range {_number(summary['range'])}",
            transform=ax.transAxes, ha="right", va="top")
    ax.set_ylabel(f"{column} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['model']} on {results['dataset']}", fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
