"""Write tests/data/sentiment/{train,dev}.tsv: short labelled review phrases, SST-2's format
(a header ``sentence<TAB>label``, label 1 positive, 0 negative), made from the word lists below.

    python tests/data/make_sentiment.py

The phrases are templated, so the task is learnable in a few steps, yet a model has to read
the opinion word (and a negation flips it). Deterministic: the files change only with this script.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "the film",
    "this movie",
    "the story",
    "the acting",
    "the script",
    "the soundtrack",
    "the ending",
    "the lead performance",
    "the direction",
    "the dialogue",
    "the cast",
    "the plot",
    "the photography",
    "the pacing",
    "this sequel",
    "the premise",
]
POSITIVE = [
    "wonderful",
    "moving",
    "funny",
    "brilliant",
    "charming",
    "gripping",
    "beautiful",
    "clever",
    "delightful",
    "touching",
    "smart",
    "thrilling",
    "warm",
    "inventive",
    "superb",
    "engaging",
]
NEGATIVE = [
    "dull",
    "boring",
    "clumsy",
    "tedious",
    "awful",
    "lifeless",
    "confusing",
    "bland",
    "shallow",
    "predictable",
    "painful",
    "flat",
    "silly",
    "tiresome",
    "forgettable",
    "sloppy",
]
INTENSIFIERS = ["", "very ", "truly ", "quite ", "remarkably ", "utterly ", "rather "]
FRAMES = [
    "{s} is {i}{a}",
    "{s} was {i}{a} from start to finish",
    "i found {s} {i}{a}",
    "{s} feels {i}{a}",
    "what a {i}{a} experience",
    "{s} turned out {i}{a}",
]
NEGATED = ["{s} is not {a}", "{s} was never {a}", "i would not call {s} {a}"]


def phrases(rng: random.Random, count: int) -> list[tuple[str, int]]:
    rows = []
    while len(rows) < count:
        label = rng.randint(0, 1)
        s, i = rng.choice(SUBJECTS), rng.choice(INTENSIFIERS)
        if rng.random() < 0.2:  # a negated opinion: the opposite word, then "not"
            a = rng.choice(NEGATIVE if label else POSITIVE)
            text = rng.choice(NEGATED).format(s=s, a=a)
        else:
            a = rng.choice(POSITIVE if label else NEGATIVE)
            text = rng.choice(FRAMES).format(s=s, i=i, a=a)
        rows.append((text, label))
    return rows


def write(path: Path, rows: list[tuple[str, int]]) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")


if __name__ == "__main__":
    rng = random.Random(2023)
    out = Path(__file__).resolve().parent / "sentiment"
    out.mkdir(exist_ok=True)
    write(out / "train.tsv", phrases(rng, 256))
    write(out / "dev.tsv", phrases(rng, 72))
