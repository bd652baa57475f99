"""Generate samples/corpus/rhymes.txt: the bundled demo corpus, written by a tiny grammar.

Deterministic (fixed seed), so the file in the repository is exactly what this prints:
    python samples/corpus/make_rhymes.py > samples/corpus/rhymes.txt
"""

import random

rng = random.Random(2)
WHO = ["the cat", "the old dog", "a little bird", "the miller", "my mother", "the king", "a fox",
       "the baker", "a sleepy owl", "the wind"]
DID = ["sat on", "ran past", "sang to", "looked at", "jumped over", "waited by", "dreamed of",
       "walked to", "laughed at", "slept near"]
WHAT = ["the mat", "the hill", "the moon", "the river", "the gate", "the old mill", "the garden",
        "the sea", "the bright stars", "the red door"]
WHEN = ["in the morning", "at night", "all day long", "when the rain came", "before the bells rang",
        "after supper", "in the spring"]


def line() -> str:
    s = f"{rng.choice(WHO)} {rng.choice(DID)} {rng.choice(WHAT)}"
    if rng.random() < 0.5:
        s += f" {rng.choice(WHEN)}"
    return s[0].upper() + s[1:] + rng.choice([".", ".", ",", "!", "?"])


def verse() -> str:
    return "\n".join(line() for _ in range(rng.randint(2, 5)))


if __name__ == "__main__":
    print("\n\n".join(verse() for _ in range(1200)))
