"""LLMLingua-2 (Pan et al. 2024): prompt compression distilled from a causal LM into a bidirectional encoder.

words.py (words, chunks at sentence ends) -> annotate.py (a teacher labels each word keep / drop) -> labels.py
(matching, quality measures, filter) -> train.py (token classification) -> compress.py (keep the most probable
words of each chunk) -> evaluate.py (what the compressed prompt keeps for a causal LM, against baselines).
Stages, formulas and the choices the paper leaves open: docs/methods.md, Prompt compression.
"""
