"""The ETO loop: SFT -> evaluate -> (explore -> pairs -> DPO -> evaluate) x iterations -> summary.

    python -m scripts.eto_pipeline sciworld exp1 MODEL SAVE --iterations 2 --num_workers 16
    bash run_eto.sh alfworld demo                                 # small budget, default model, CPU
    bash run_eto.sh webshop my_exp /path/to/Llama-2-7b-chat outputs

Every stage runs as a subprocess with its log under <save>/<exp>/logs/<stage>.log; a failed stage stops
the run with its name and log path. Serving processes (controller, model workers) are started per model,
polled until they answer (never a fixed sleep) and stopped on success, failure or Ctrl-C. A finished stage
writes <save>/<exp>/stages/<stage>.json; a rerun with the same exp_name skips finished stages, and an
interrupted evaluation/exploration resumes episode by episode. Knobs (docs/knobs.md, or --help): flags,
ETO_<KNOB> environment variables, a YAML file given with --config FILE, and presets named by exp_name.
"""
from __future__ import annotations

import sys

from scripts.pipeline.settings import PipelineSettings
from scripts.pipeline.settings import parse_args as parse_settings
from scripts.pipeline.stages import run


def parse_args(argv: list[str] | None = None) -> PipelineSettings:
    """The run's settings; a bad value exits with status 2 and one line saying where it came from."""
    return parse_settings(argv, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
