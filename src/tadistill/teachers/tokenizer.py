"""A byte-level BPE tokenizer trained on a list of texts (the GPT-2 scheme).

Byte-level BPE (Radford et al. 2019, GPT-2, section 2.2) starts from the 256 byte values, so every
string encodes without an unknown token and decodes back to itself exactly; merges are learned from
the texts with the ``tokenizers`` library. As in GPT-2, one special token ``<|endoftext|>`` serves as
end-of-text, beginning-of-text and padding, and no special token is added when encoding a text: the
packer puts it between documents itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tadistill.errors import ConfigError, DataError

END_OF_TEXT = "<|endoftext|>"
_BYTES = 256  # the byte-level alphabet: every vocabulary holds these before any merge


def train_bpe_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; deterministic for the same texts and settings.

    Args:
        texts: the training texts (documents or paragraphs); empty strings are skipped.
        vocab_size: final vocabulary size, bytes and ``<|endoftext|>`` included (>= 258). It can end
            up smaller when the texts hold fewer pairs of ``min_frequency`` occurrences.
        min_frequency: a pair must occur this often to be merged.
        model_max_length: the context length recorded in the tokenizer (the model's positions).

    Returns:
        A fast tokenizer with ``eos_token == bos_token == pad_token == unk_token == "<|endoftext|>"``
        that adds no special tokens on encoding; ``decode(encode(t)) == t`` for every string ``t``.
    """
    if vocab_size < _BYTES + 2:
        raise ConfigError(f"vocab_size={vocab_size} is too small for byte-level BPE: use at least {_BYTES + 2}")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency={min_frequency} must be at least 1")
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("cannot train a tokenizer on no text: pass a non-empty list of strings")

    tok = Tokenizer(models.BPE())
    # No prefix space: GPT-2's choice, which keeps decode(encode(t)) == t for texts starting with a word.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the texts or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # the cleanup would rewrite " ." to "." and break round trips
    )
