"""Engines that call minlora: the vLLM plugin (minlora.integrations.vllm)."""
