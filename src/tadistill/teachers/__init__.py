"""Teachers tadistill trains itself when no model hub is reachable.

``spec`` says what determines the small GPT-2-style causal LM behind ``builtin-gpt2`` and where its trained
copy is cached (loading looks the alias up there); ``causal`` trains it, with a byte-level BPE tokenizer
from ``tokenizer``, as an ordinary distill run on the built-in corpus, so that the causal-LM examples have
a real teacher to distill.
"""
