"""A small generated task with verifiable answers: short English word problems.

Every example is a `Question: ...\\nAnswer:` prompt and a short completion (a number, a word, a day or a place)
whose correctness can be recomputed from the prompt alone, so [`is_correct`] checks a generation without a reference
column. Nine kinds of question mix arithmetic (add, subtract, count), comparison, a memorised successor (tomorrow's
day), copying from context (the first person's colour; and two-object "where is" questions that need binding, the
hardest kind), and two open questions with several right answers ("pick one of these things", "say a number smaller
than n"), where the training data names one right answer at random. A tiny model trained for a minute on CPU gets
the easy kinds right and few of the hard ones, which leaves room between a teacher and a student; the open questions
are where a teacher's full distribution tells a student more than the one sampled reference does.

Format, consistent with TRL's `SFTTrainer` on prompt/completion data: the prompt ends with `"Answer:"` and the
completion is `" <answer>"` with no end-of-sequence text. `SFTTrainer` appends `tokenizer.eos_token` to each
completion, so the model learns to stop after the answer; `trl_distill.evaluation` appends it the same way.

The train and test splits are disjoint by construction: a prompt belongs to the test split when a hash of its text
falls in one bucket out of ten, whatever the seed, so no test prompt can appear in any training set.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # `datasets` is imported lazily: `import trl_distill.demo` stays cheap
    from datasets import Dataset


SPLITS = ("train", "test")
_TEST_BUCKETS = 10  # one prompt in ten goes to the test split

NAMES = (
    "Mia",
    "Noah",
    "Emma",
    "Liam",
    "Olivia",
    "Ethan",
    "Ava",
    "Lucas",
    "Sophia",
    "Mason",
    "Isabella",
    "Logan",
    "Amelia",
    "James",
    "Harper",
    "Elijah",
    "Evelyn",
    "Oliver",
    "Abigail",
    "Jacob",
    "Emily",
    "Daniel",
    "Ella",
    "Henry",
    "Grace",
    "Samuel",
    "Chloe",
    "David",
    "Lily",
    "Joseph",
    "Hannah",
    "Carter",
    "Zoe",
    "Owen",
    "Nora",
    "Wyatt",
    "Riley",
    "Julian",
    "Layla",
    "Leo",
    "Aria",
    "Isaac",
    "Stella",
    "Gabriel",
    "Violet",
    "Anthony",
    "Hazel",
    "Dylan",
    "Aurora",
    "Thomas",
    "Lucy",
    "Charles",
    "Anna",
    "Caleb",
    "Alice",
    "Ryan",
    "Sarah",
    "Nathan",
    "Clara",
    "Adrian",
    "Ruby",
    "Aaron",
    "Eva",
    "Felix",
    "Iris",
    "Hugo",
    "Maya",
    "Oscar",
    "Nina",
    "Victor",
    "Rosa",
    "Peter",
    "Laura",
    "Simon",
    "Elena",
    "Martin",
    "Julia",
    "Frank",
    "Helen",
    "George",
)
ITEMS = (
    "apples",
    "pears",
    "oranges",
    "bananas",
    "cherries",
    "lemons",
    "plums",
    "peaches",
    "grapes",
    "melons",
    "marbles",
    "pencils",
    "crayons",
    "stickers",
    "buttons",
    "coins",
    "stamps",
    "shells",
    "stones",
    "feathers",
    "cookies",
    "muffins",
    "candies",
    "cupcakes",
    "balloons",
    "books",
    "cards",
    "toys",
    "kites",
    "flowers",
)
OBJECTS = (
    "ball",
    "key",
    "book",
    "cup",
    "hat",
    "lamp",
    "spoon",
    "clock",
    "ring",
    "shoe",
    "sock",
    "coat",
    "bell",
    "drum",
    "map",
    "box",
    "bag",
    "pen",
    "brush",
    "comb",
)
PLACES = (
    "kitchen",
    "garden",
    "bedroom",
    "garage",
    "office",
    "hallway",
    "basement",
    "attic",
    "bathroom",
    "closet",
    "drawer",
    "basket",
    "cupboard",
    "library",
    "classroom",
    "car",
    "tent",
    "shed",
    "barn",
    "porch",
)
ANIMALS = (
    "cat",
    "dog",
    "cow",
    "horse",
    "sheep",
    "goat",
    "pig",
    "duck",
    "hen",
    "fox",
    "wolf",
    "bear",
    "deer",
    "mouse",
    "rabbit",
    "frog",
    "owl",
    "eagle",
    "lion",
    "tiger",
    "zebra",
    "monkey",
    "panda",
    "camel",
    "whale",
    "shark",
    "snake",
    "turtle",
    "parrot",
    "donkey",
)
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "brown", "gray", "gold")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
GAIN_VERBS = ("finds", "buys", "gets", "receives", "picks up", "wins")

_WORD = r"([A-Za-z]+)"
_NUM = r"(\d+)"


class _Kind:
    """One kind of question: a generator of question texts, and the regex + solver that recompute the answers."""

    def __init__(self, name: str, generate: Callable, pattern: str, solve: Callable):
        self.name = name
        self.generate = generate  # (rng) -> question text, without the "Question: " / "\nAnswer:" frame
        self.pattern = re.compile(pattern)  # full match on the question text
        self.solve = solve  # (re.Match) -> every correct answer, as strings


def _two_names(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NAMES, 2)
    return first, second


def _gen_add(rng):
    name, items, verb = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(GAIN_VERBS)
    a, b = rng.randint(0, 9), rng.randint(1, 9)
    return f"{name} has {a} {items}. {name} {verb} {b} more. How many {items} does {name} have now?"


def _gen_sub(rng):
    (name, other), items = _two_names(rng), rng.choice(ITEMS)
    a = rng.randint(1, 9)
    b = rng.randint(0, a)
    return f"{name} has {a} {items} and gives {b} of them to {other}. How many {items} does {name} have left?"


def _gen_bigger(rng):
    a, b = rng.sample(range(10), 2)
    return f"{rng.choice(NAMES)} thinks of {a} and {b}. Which number is bigger?"


def _gen_tomorrow(rng):
    return f"{rng.choice(NAMES)} says that today is {rng.choice(DAYS)}. What day is it tomorrow?"


def _gen_count(rng):
    animals = rng.sample(ANIMALS, rng.randint(1, 6))
    return f"{rng.choice(NAMES)} sees these animals: {', '.join(animals)}. How many animals does the list have?"


def _gen_color(rng):
    (name, other), (color, other_color) = _two_names(rng), rng.sample(COLORS, 2)
    return f"{name} likes {color} and {other} likes {other_color}. Which color does {name} like?"


def _gen_pick(rng):
    name, things = rng.choice(NAMES), rng.sample(OBJECTS, rng.randint(2, 4))
    return f"{name} may take one of these things: {', '.join(things)}. Which thing does {name} take?"


def _gen_smaller(rng):
    return f"{rng.choice(NAMES)} thinks of {rng.randint(1, 9)}. Say a number smaller than that."


def _gen_where(rng):
    (name, other), (obj, other_obj), (place, other_place) = (
        _two_names(rng),
        rng.sample(OBJECTS, 2),
        rng.sample(PLACES, 2),
    )
    asked = rng.choice((obj, other_obj))
    return (
        f"{name} puts the {obj} in the {place}. {other} puts the {other_obj} in the {other_place}. "
        f"Where is the {asked}?"
    )


def _solve_where(m: re.Match) -> tuple[str]:
    obj, place, other_obj, other_place, asked = m.group(2, 3, 5, 6, 7)
    if asked == obj:
        return (place,)
    if asked == other_obj:
        return (other_place,)
    raise ValueError(f"The question asks for {asked!r}, which neither sentence mentions.")


_KINDS = (
    _Kind(
        "add",
        _gen_add,
        rf"{_WORD} has {_NUM} {_WORD}\. \1 (?:{'|'.join(GAIN_VERBS)}) {_NUM} more\. "
        rf"How many \3 does \1 have now\?",
        lambda m: (str(int(m.group(2)) + int(m.group(4))),),
    ),
    _Kind(
        "sub",
        _gen_sub,
        rf"{_WORD} has {_NUM} {_WORD} and gives {_NUM} of them to {_WORD}\. How many \3 does \1 have left\?",
        lambda m: (str(int(m.group(2)) - int(m.group(4))),),
    ),
    _Kind(
        "bigger",
        _gen_bigger,
        rf"{_WORD} thinks of {_NUM} and {_NUM}\. Which number is bigger\?",
        lambda m: (str(max(int(m.group(2)), int(m.group(3)))),),
    ),
    _Kind(
        "tomorrow",
        _gen_tomorrow,
        rf"{_WORD} says that today is {_WORD}\. What day is it tomorrow\?",
        lambda m: (DAYS[(DAYS.index(m.group(2)) + 1) % len(DAYS)],),
    ),
    _Kind(
        "count",
        _gen_count,
        rf"{_WORD} sees these animals: ([a-z]+(?:, [a-z]+)*)\. How many animals does the list have\?",
        lambda m: (str(len(m.group(2).split(", "))),),
    ),
    _Kind(
        "color",
        _gen_color,
        rf"{_WORD} likes {_WORD} and {_WORD} likes {_WORD}\. Which color does {_WORD} like\?",
        lambda m: ({m.group(1): m.group(2), m.group(3): m.group(4)}[m.group(5)],),
    ),
    # The two open questions: several answers are right, and the training data names one of them at random. A
    # teacher learns a spread over the right answers, which one sampled reference cannot show a student.
    _Kind(
        "pick",
        _gen_pick,
        rf"{_WORD} may take one of these things: ([a-z]+(?:, [a-z]+)*)\. Which thing does \1 take\?",
        lambda m: tuple(m.group(2).split(", ")),
    ),
    _Kind(
        "smaller",
        _gen_smaller,
        rf"{_WORD} thinks of {_NUM}\. Say a number smaller than that\.",
        lambda m: tuple(str(k) for k in range(int(m.group(2)))),
    ),
    _Kind(
        "where",
        _gen_where,
        rf"{_WORD} puts the {_WORD} in the {_WORD}\. {_WORD} puts the {_WORD} in the {_WORD}\. "
        rf"Where is the {_WORD}\?",
        _solve_where,
    ),
)
KIND_NAMES = tuple(kind.name for kind in _KINDS)

_PROMPT_PREFIX, _PROMPT_SUFFIX = "Question: ", "\nAnswer:"


def _split_of(prompt: str) -> str:
    # sha256, not `hash()`: Python's string hash is salted per process, the split must not be.
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % _TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")


def _sample_prompt(rng: random.Random) -> str:
    kind = _KINDS[rng.randrange(len(_KINDS))]
    return f"{_PROMPT_PREFIX}{kind.generate(rng)}{_PROMPT_SUFFIX}"


def _match(prompt: str) -> tuple[_Kind, re.Match]:
    if not (prompt.startswith(_PROMPT_PREFIX) and prompt.endswith(_PROMPT_SUFFIX)):
        raise ValueError(
            f"`prompt` must look like {_PROMPT_PREFIX!r} + question + {_PROMPT_SUFFIX!r} (as `make_task_dataset` "
            f"writes it), got {prompt!r}."
        )
    question = prompt[len(_PROMPT_PREFIX) : -len(_PROMPT_SUFFIX)]
    for kind in _KINDS:
        match = kind.pattern.fullmatch(question)
        if match is not None:
            return kind, match
    raise ValueError(f"`prompt` matches none of the task's question kinds {KIND_NAMES}: {prompt!r}.")


def kind_of(prompt: str) -> str:
    """Name of the question kind of `prompt` (one of `KIND_NAMES`); raises `ValueError` for a foreign prompt."""
    return _match(prompt)[0].name


def correct_answers(prompt: str) -> tuple[str, ...]:
    """
    Every correct answer to a task prompt, recomputed from its text.

    Args:
        prompt (`str`): A prompt written by [`make_task_dataset`].

    Returns:
        `tuple[str, ...]`: the answers, without the leading space the completion has. One answer for most kinds;
        several for the open kinds (`"pick"`, `"smaller"`).

    Raises:
        `ValueError`: if `prompt` is not a prompt of this task.
    """
    kind, match = _match(prompt)
    return kind.solve(match)


def make_task_dataset(n: int, *, seed: int, split: str = "train") -> Dataset:
    """
    Generate `n` distinct examples of the task in TRL's prompt/completion format.

    Args:
        n (`int`):
            Number of rows.
        seed (`int`):
            Seed of the generator; the same `(n, seed, split)` gives the same rows, in the same order.
        split (`str`, *optional*, defaults to `"train"`):
            `"train"` or `"test"`. The two are disjoint for every pair of seeds (see the module docstring).

    Returns:
        `datasets.Dataset` with string columns `prompt` (ending with `"\\nAnswer:"`) and `completion` (`" <answer>"`,
        no end-of-sequence text: `SFTTrainer` appends `eos_token`). For open questions the completion is one of the
        correct answers, drawn uniformly.
    """
    from datasets import Dataset

    _check_split(split)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}.")
    rng = random.Random(f"trl_distill.demo.task/{seed}/{split}")  # str seeds are hashed deterministically
    prompts: dict[str, None] = {}  # ordered set
    max_draws = 50 * n + 1000
    for _ in range(max_draws):
        prompt = _sample_prompt(rng)
        if _split_of(prompt) == split:
            prompts[prompt] = None
            if len(prompts) == n:
                break
    else:
        raise ValueError(f"Could not draw {n} distinct `{split}` prompts in {max_draws} tries; ask for fewer rows.")
    rows = list(prompts)
    # A separate stream for the open answers, so the prompts do not change when the answer sampling does.
    answer_rng = random.Random(f"trl_distill.demo.task/{seed}/{split}/answers")
    completions = [" " + answer_rng.choice(correct_answers(prompt)) for prompt in rows]
    return Dataset.from_dict({"prompt": rows, "completion": completions})


def task_corpus(seed: int, n: int = 4000) -> list[str]:
    """
    Texts to train the task's tokenizer on: `n` training examples (prompt + completion) and every word list.

    Only the train split is used, so the tokenizer never sees a test prompt; the word lists make sure every name,
    object and place of the test split is in the vocabulary as well.

    Args:
        seed (`int`): Seed of the generator.
        n (`int`, *optional*, defaults to `4000`): Number of examples.

    Returns:
        `list[str]`
    """
    rows = make_task_dataset(n, seed=seed, split="train")
    texts = [prompt + completion for prompt, completion in zip(rows["prompt"], rows["completion"])]
    for words in (NAMES, ITEMS, OBJECTS, PLACES, ANIMALS, COLORS, DAYS, GAIN_VERBS):
        # twice: `build_tokenizer` keeps only merges seen at least twice (`min_frequency=2`)
        texts.extend([" ".join(words)] * 2)
    return texts


def is_correct(prompt: str, completion_text: str) -> bool:
    """
    Whether a generated completion answers a task prompt correctly.

    The completion is cut at the first end-of-sequence text (`"<|eos|>"`) or newline, stripped of spaces, and must
    equal one of [`correct_answers`] exactly (so `" 7"` is right and `" 7 7"` or `" seven"` are wrong).

    Args:
        prompt (`str`): A prompt written by [`make_task_dataset`].
        completion_text (`str`): The generated text after the prompt (special tokens skipped or not).

    Returns:
        `bool`
    """
    if not isinstance(completion_text, str):
        raise TypeError(f"`completion_text` must be a str, got {type(completion_text).__name__}.")
    text = completion_text.split("<|eos|>", 1)[0].split("\n", 1)[0].strip()
    return text in correct_answers(prompt)
