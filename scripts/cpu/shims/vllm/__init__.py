"""CPU-serving shim (written by kvtuner-hicache, not vLLM code): see _custom_ops.py."""
