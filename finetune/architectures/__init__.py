"""What an architecture is, pure and torch-free: the ground the preflight, the probes and the models stand on.

spec.py (ArchSpec, its linear layers and roles, the hand-written families), catalog.py (hub ids -> config.json,
local model directories, models.json), targets.py (LoRA target presets and their resolution), tiny.py (the tiny
models' configs, as data). Families without hand-written rules are traced by finetune.probes.
"""
