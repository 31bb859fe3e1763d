"""Pair rules: what `python -m scripts.construct_preference` builds from exploration outputs.

rule: what a rule is and the registry of rules (one module per rule: expert, self, step); files: the expert and
explored records, loaded and checked; trajectory: what the trajectory rules share. Pair records are
fastchat.records' pair_record.
"""
