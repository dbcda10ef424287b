"""Train the tiny byte-level BPE tokenizer in flexkd/assets/tiny-tokenizer/ (tests, debug runs).

Usage: python scripts/make_tiny_tokenizer.py [--data ../shared/data] [--out flexkd/assets/tiny-tokenizer]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 512
# ChatML markers as in SmolLM2-Instruct; <|endoftext|> first so that it gets id 0 and pads.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def training_text(data: Path) -> Iterator[str]:
    """First 5000 SST-2 training sentences, then the first 2000 T0-mix prompts and completions."""
    with (data / "sst2" / "train.tsv").open(newline="") as sst2:
        rows = csv.DictReader(sst2, delimiter="\t", quoting=csv.QUOTE_NONE)
        yield from (row["sentence"] for row in islice(rows, 5000))
    with (data / "t0_mix" / "train.jsonl").open() as t0_mix:
        for line in islice(t0_mix, 2000):
            record = json.loads(line)
            yield record["prompt"] + record["completion"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "flexkd" / "assets" / "tiny-tokenizer")
    args = parser.parse_args()

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_text(args.data), trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(args.out)
    print(f"saved {len(tokenizer)} tokens to {args.out}")


if __name__ == "__main__":
    main()
