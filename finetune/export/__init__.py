"""The export stage: the adapter merged and written where people run models (command.py: ``finetune-export``),
as GGUF files by llama.cpp's own converter and quantizer (llama_cpp.py), checked in llama.cpp (check.py), and an Ollama Modelfile (modelfile.py)."""

from finetune.export.command import export, main

__all__ = ["export", "main"]
