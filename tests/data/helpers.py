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
