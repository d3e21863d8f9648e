"""Writes the bundled English -> French corpus for examples/translate.yaml and the model directory it
trains from scratch: a tokenizer learned on the corpus and a small T5 config (no pretrained seq2seq
model can be downloaded here). Deterministic.

Sentences are composed from a small lexicon with French word order and agreement (adjectives after
the noun, agreeing in gender); the test sentences are combinations never seen in training.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SUBJECTS = [("cat", "chat", "m"), ("dog", "chien", "m"), ("girl", "fille", "f"), ("boy", "garçon", "m"),
            ("woman", "femme", "f"), ("neighbour", "voisin", "m"), ("mouse", "souris", "f"), ("horse", "cheval", "m"),
            ("cow", "vache", "f"), ("queen", "reine", "f")]  # fmt: skip
OBJECTS = [("apple", "pomme", "f"), ("bread", "pain", "m"), ("ball", "ballon", "m"), ("cheese", "fromage", "m"),
           ("book", "livre", "m"), ("flower", "fleur", "f"), ("car", "voiture", "f"), ("door", "porte", "f")]  # fmt: skip
ADJECTIVES = [("black", "noir", "noire"), ("green", "vert", "verte"), ("red", "rouge", "rouge"),
              ("white", "blanc", "blanche"), ("happy", "content", "contente"), ("tired", "fatigué", "fatiguée"),
              ("small", "minuscule", "minuscule")]  # fmt: skip
VERBS = [("eats", "mange"), ("sees", "voit"), ("likes", "aime"), ("watches", "regarde"), ("finds", "trouve"),
         ("follows", "suit"), ("wants", "veut")]  # fmt: skip


def phrase(rng, nouns, adjective_rate=0.5):
    en, fr, gender = rng.choice(nouns)
    article = "le" if gender == "m" else "la"
    if rng.random() < adjective_rate:
        a_en, a_m, a_f = rng.choice(ADJECTIVES)
        return f"the {a_en} {en}", f"{article} {fr} {a_m if gender == 'm' else a_f}"
    return f"the {en}", f"{article} {fr}"


def sentence(rng):
    s_en, s_fr = phrase(rng, SUBJECTS)
    v_en, v_fr = rng.choice(VERBS)
    o_en, o_fr = phrase(rng, OBJECTS)
    return f"{s_en} {v_en} {o_en}.".capitalize(), f"{s_fr} {v_fr} {o_fr}.".capitalize()


def write_corpus(train_size=800, test_size=60, seed=3):
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < train_size + test_size:
        en, fr = sentence(rng)
        if en not in seen:
            seen.add(en)
            rows.append({"source": en, "target": fr})
    for name, part in (("train.jsonl", rows[:train_size]), ("test.jsonl", rows[train_size:])):
        with open(HERE / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)


def build_model_dir(texts, out, d_model=128, layers=2, heads=4, vocab_size=400):
    """A BPE tokenizer learned on `texts` (pad 0, eos 1, unk 2, as T5) and a fresh T5 config, saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(vocab_size=len(fast), d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model, num_layers=layers,
                      num_decoder_layers=layers, num_heads=heads, dropout_rate=0.1, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)  # fmt: skip
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    config.save_pretrained(out)


def main():
    write_corpus()
    rows = [json.loads(line) for line in (HERE / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    build_model_dir([r["source"] for r in rows] + [r["target"] for r in rows], HERE / "model")


if __name__ == "__main__":
    main()
