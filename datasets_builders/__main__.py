"""python -m datasets_builders NAME --output_dir OUT ...: a user error ends in one line, `error: ...`, with exit
status 2 (`--debug` shows the traceback)."""
from training_scripts.cli import run_cli

from .export import main

run_cli(main)
