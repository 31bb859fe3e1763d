"""The project's command-line programs and the library behind them.

Run from the repository root as `python -m scripts.<name>` (the file form `python scripts/<name>.py` works too,
through the editable install). Each entry point (eto_pipeline, construct_preference, dpo_diagnostics, fetch_data,
convert_eto_sft, build_<task>_sft, eto_summary) parses its arguments and calls into the library:
- scripts.pipeline: the ETO loop behind run_eto.sh (settings, serving processes, stages, methods, summary);
- scripts.pairs: the pair rules (expert, self, step) and the loading of the records they pair.
"""
