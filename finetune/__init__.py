"""finetune: declarative QLoRA fine-tuning with a memory plan that fits your GPU.

Import cost matters here: the CLI's help and the preflight import this package and
must not pull in torch, transformers or mlflow (they are imported inside the stages).
"""

__version__ = "0.1.0"
