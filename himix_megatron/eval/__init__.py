"""Benchmark evaluation of HiMix models: answer generation (himix-eval) and official-style scoring."""
