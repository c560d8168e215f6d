"""The merge engine: streaming, memory-bounded fusion of branch checkpoints (safetensors in, out)."""
