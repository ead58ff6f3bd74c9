"""README.md keeps a main-job command that runs on a fresh machine, and the test command CI runs."""

import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_main_job_runs_on_the_embedded_default(tmp_path):
    command = bash_blocks()[1].strip()
    assert "--dataset synthetic" in command
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, whatever is installed
    job = subprocess.run(command, shell=True, check=True, cwd=tmp_path, capture_output=True, text=True, env=env)
    # quiet: its output fits on one screen apart from its progress bars, at most one bar per language (and the
    # model's saving and loading and the images); no third-party warning the library can avoid
    lines = [line for line in re.split(r"[\r\n]+", job.stdout + job.stderr) if line.strip()]
    bars = {line.split(":")[0] for line in lines if re.search(r"\|.*\[\d\d:\d\d", line)}
    other = [line for line in lines if not re.search(r"\|.*\[\d\d:\d\d", line)]
    assert len(other) <= 24 and not [line for line in other if "warn" in line.lower()], other
    assert not [bar for bar in bars if "split" in bar], bars  # datasets' "Generating ... split"
    results = json.loads((tmp_path / "eval-tiny" / "results.json").read_text())
    assert len(bars) <= len(results["languages"]) + 3, bars
    assert results["dataset"] == "synthetic" and len(results["languages"]) >= 10
    assert set(results["summary"]["r1_mean"]) == {"avg", "avg_en", "std", "range"}
    assert (tmp_path / "eval-tiny" / "results.png").stat().st_size > 0


def test_ci_runs_the_readme_test_command():
    test_command = bash_blocks()[2].strip()
    assert test_command.startswith("python -m pytest")
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()


def test_bad_input_table_rows_each_name_an_existing_test():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Bad input and what you get")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| bad input", "| ---"))]
    tests = "".join(path.read_text() for path in (REPO / "tests").glob("test_*.py"))
    assert len(rows) >= 20
    for row in rows:
        name = row.rstrip(" |").rsplit("| ", 1)[1].strip("` ")
        assert name.startswith("test_") and f"def {name}(" in tests, row
