"""The tiny model's numbers: its Llama shape and its byte tokenizer's layout.

No imports: `finetune plan` sizes the tiny model from these without torch or transformers, and
finetune.models.tiny builds the real one from the same numbers.
"""

PAD, BOS_UNUSED, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [PAD, BOS_UNUSED, EOS]
BYTE_OFFSET = len(SPECIALS)  # token id = byte value + BYTE_OFFSET
VOCAB_SIZE = BYTE_OFFSET + 256

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
