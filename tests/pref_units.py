"""Hand-made preference units following the data contract (finetune.data.preference): token ids
of the tiny model's byte-level vocabulary. Not a test file."""

import torch


def ids(gen, n):
    return torch.randint(3, 259, (n,), generator=gen).tolist()


def pairs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": ids(g, 3 + 2 * i), "chosen_ids": ids(g, 2 + i), "rejected_ids": ids(g, 4 - i % 3)}
            for i in range(n)]


def feedback(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": ids(g, 3 + i), "completion_ids": ids(g, 2 + i), "label": i % 2 == 0} for i in range(n)]
