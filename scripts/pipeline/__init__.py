"""The ETO loop behind run_eto.sh and `python -m scripts.eto_pipeline`.

settings: flags, environment variables and presets; services: the serving processes of a stage; backends: the
serving backends they start (registered); stages: the Pipeline (one method per stage, resume, settings checks);
methods: the loop of each method on those stages (registered); summary: the run's results, intervals and costs.
The run folder's paths are eval_agent.run_layout's.
"""
