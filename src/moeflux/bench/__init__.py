"""The benchmark and correctness suite behind ``moeflux bench`` and ``moeflux check``."""
