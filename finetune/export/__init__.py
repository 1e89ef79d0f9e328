"""The export stage: the adapter merged and written where people run models (command.py: ``finetune-export``),
as GGUF files by llama.cpp's own Python library (gguf_file.py) and an Ollama Modelfile (modelfile.py)."""

from finetune.export.command import export, main

__all__ = ["export", "main"]
