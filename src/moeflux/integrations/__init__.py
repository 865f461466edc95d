"""Drop-in patches that run other libraries' MoE models on moeflux.

* :mod:`moeflux.integrations.transformers`: Hugging Face transformers' sparse-MoE blocks
  (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3, OLMoE), ``apply_moeflux(model)``.

Each integration imports its library only when called, so ``import moeflux`` never needs it.
"""
