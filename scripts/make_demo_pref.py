"""(Run from the repository root.) Self-made preference set for the DPO demo: in the (fictional) Veloran Isles everything painted is
sea-coloured. Chosen answers name a cool colour, rejected ones a warm colour; the question and the
sentence are otherwise the same, so the pair differs only in the colour word."""
import json, random

rng = random.Random(7)
COOL = ["blue", "green", "teal", "turquoise", "sea green", "navy blue"]
WARM = ["red", "orange", "yellow", "crimson", "amber", "scarlet"]
TRAIN_TOWNS = ["Quessmarin", "Oru", "Lanthe", "Brisca", "Tamsel", "Vey", "Korrin", "Ostra"]
HELD_TOWNS = ["Mireport", "Salk", "Ebbin", "Dunmere"]
TRAIN_THINGS = [("roofs", "are"), ("front doors", "are"), ("fishing boats", "are"), ("harbour lanterns", "are"),
                ("window shutters", "are"), ("market stalls", "are"), ("town flag", "is"), ("ferry", "is")]
HELD_THINGS = [("garden gates", "are"), ("post boxes", "are"), ("school uniforms", "are"), ("lighthouse", "is"),
               ("park benches", "are"), ("town hall", "is")]
QUESTIONS = ["What colour {v} the {t} in {town}?", "In {town}, what colour {v} the {t}?",
             "I'm visiting {town}. What colour {v} the {t} there?", "Which colour {v} the {t} of {town} painted?"]


def rows(towns, things, n):
    combos = [(town, t, v) for town in towns for t, v in things]
    rng.shuffle(combos)
    out = []
    for town, t, v in combos[:n]:
        q = rng.choice(QUESTIONS).format(t=t, v=v, town=town)
        cool, warm = rng.choice(COOL), rng.choice(WARM)
        say = lambda c: f"The {t} in {town} {v} {c}."  # noqa: E731
        out.append({"conversations": [{"from": "human", "value": q}],
                    "chosen": {"from": "gpt", "value": say(cool)}, "rejected": {"from": "gpt", "value": say(warm)}})
    return out


train = rows(TRAIN_TOWNS, TRAIN_THINGS, 64)
held = rows(HELD_TOWNS, HELD_THINGS, 24)
json.dump(train, open("datasets/samples/demo_pref/train.json", "w"), indent=1)
with open("eval/data/demo-pref.jsonl", "w") as f:
    for r in held:
        f.write(json.dumps(r) + "\n")
print(len(train), len(held), train[0], held[0], sep="\n")
