"""Hand-writing expected token ids for the tiny byte tokenizer: id = byte + 3."""

IM_START, IM_END, PAD = 1, 2, 0
X = -100


def B(s: str) -> list[int]:
    return [b + 3 for b in s.encode()]


def build(*pieces) -> tuple[list[int], list[int]]:
    """pieces: (ids, trained: bool) -> (input_ids, labels); the first label is always -100."""
    ids, labels = [], []
    for p, trained in pieces:
        ids += p
        labels += p if trained else [X] * len(p)
    labels[0] = X
    return ids, labels


def chatml_turn(role: str, content: str, trained: bool = False):
    """ChatML pieces for one turn; an assistant turn trains content + <|im_end|>, never the newline."""
    return [([IM_START] + B(f"{role}\n"), False), (B(content) + [IM_END], trained), (B("\n"), False)]


def merging_tokenizer():
    """The byte tokenizer plus one BPE merge, newline + space -> one token (id 259), as real BPE
    vocabularies have: the token that straddles a header's last newline and an answer's space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from finetune.models.tiny import SPECIALS, byte_tokenizer

    base = byte_tokenizer()
    vocab = dict(base.backend_tokenizer.model.get_vocab() if hasattr(base.backend_tokenizer.model, "get_vocab")
                 else base.get_vocab())
    for s in SPECIALS:
        vocab.pop(s, None)
    vocab.update({s: i for i, s in enumerate(SPECIALS)})
    vocab["ĊĠ"] = 259
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ġ")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=SPECIALS[0], eos_token=SPECIALS[2])
    fast.chat_template = base.chat_template
    return fast


def seen(renderer, conv) -> dict:
    """What the model sees for `conv`: the `finetune data dump=` record (text, ids, labels, trained)."""
    from finetune.data.dump import record

    ids, labels = renderer.tokenize(conv)
    return record(renderer.tokenizer, ids, labels)


# A small tools-capable template in the shape of Qwen2.5's: tool schemas in the system turn,
# calls as <tool_call> JSON inside the assistant turn, tool results as a user turn.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' + (messages[0].content + '\\n\\n' if messages[0].role == 'system' else '')"
    " + '# Tools\\n<tools>' }}{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'assistant' %}{{ '<|im_start|>assistant' }}{% if m.content %}{{ '\\n' + m.content }}{% endif %}"
    "{%- for c in m.tool_calls or [] %}{{ '\\n<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": '"
    " + (c.function.arguments | tojson) + '}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
