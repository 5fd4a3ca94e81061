"""``python -m llm_training`` runs the main job, like ``python -m llm_training.main``."""

import sys

from llm_training.cli.main_job import cli_main

sys.exit(cli_main(sys.argv[1:]))
