"""Teachers tadistill trains itself when no model hub is reachable.

``causal`` trains a small GPT-2-style causal LM (and its byte-level BPE tokenizer from ``tokenizer``)
on the built-in corpus and caches it, so that the causal-LM examples have a real teacher to distill.
"""
