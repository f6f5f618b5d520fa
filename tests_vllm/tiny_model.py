"""The tiny model of the vLLM tests: a randomly initialised Llama and a word-level tokenizer
trained here with ``tokenizers``, both written with ``save_pretrained`` into a local folder that
vLLM and transformers load offline (no hub).

The text is generated from a fixed seed over a few hundred made-up words, so that the folder's
bytes, and therefore the kvstore namespace the connector derives from them, are the same on
every run with the same transformers release.
"""

from __future__ import annotations

import random
from pathlib import Path

NUM_WORDS = 1000
SEED = 0


def words() -> list[str]:
    """The made-up vocabulary: pronounceable, distinct, whitespace-free."""
    rng = random.Random(SEED)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < NUM_WORDS:
        syllables = rng.randint(1, 3)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def text(num_words: int, seed: int) -> str:
    """``num_words`` words of the vocabulary in a seeded order."""
    vocab = words()
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(num_words))


def build(folder: Path) -> Path:
    """Write the model and tokenizer into ``folder`` (kept when already there)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = [text(200, seed) for seed in range(50)]
    trainer = trainers.WordLevelTrainer(vocab_size=NUM_WORDS + 16, special_tokens=specials)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: 2 K/V heads of 32 dims
        head_dim=32,
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the default 0.02 so the output depends on the context (see
        # kvstore.worker.model.default_config): a lost or misplaced block then changes the tokens.
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1])))
