"""SFT data: examples from files or built-in names -> token ids with loss masks -> micro-batches.

    examples = load_examples("chatterbot", seed=0)              # sources.py, builtin.py
    train, evals = split_train_eval(examples, eval_size=64, seed=0)
    tokenized, stats = tokenize(train, tokenizer, seq_len=512)  # tokens.py; log stats.summary()
    for batch in batches(tokenized, 8, 512, packing=False, pad_id=0, seed=0, epoch=0):  # batching.py
        loss = model(**batch).loss

The loss covers assistant/completion tokens only (content plus the end-of-turn token), found through the
tokenizer's own chat template.
"""

from regretless.data.batching import batches, count_batches
from regretless.data.builtin import BUILTINS
from regretless.data.sources import load_examples, split_train_eval
from regretless.data.tokens import Tokenized, TokenizeStats, tokenize

__all__ = [
    "BUILTINS",
    "TokenizeStats",
    "Tokenized",
    "batches",
    "count_batches",
    "load_examples",
    "split_train_eval",
    "tokenize",
]
