"""Long-context tasks that the project writes itself: deterministic from a seed, nothing downloaded.

Every task hides a *needle* (the information the answer needs) somewhere in a long text and asks about it at
the end, so a model can answer only if it carries the needle across the gap between the needle and the
question. When that gap exceeds the attention window, attention alone cannot reach the needle; Titans' neural
memory (paper Sec. 3) can.

- `passkey`: one sentence "The secret code for <name> is <digits>." in a haystack of neutral filler sentences,
  then "What is the secret code for <name>?" (needle-in-a-haystack, in the style of RULER's single-needle task).
- `recall`: multi-query associative recall: a block of `key=value` lines (`kib=417`), a long gap of filler, then
  a question about a few of the keys; the answer lists their values in the order asked.
- `mqar`: the same block and gap, asked in the block's own form (Zoology's multi-query associative recall): the
  prompt ends with a key and `=`, and each value is to follow its key as it did in the block.
- `babi`: a story from a small world simulator: people move between places, pick up, drop and hand over
  objects, among distractor sentences; the question asks where a person or an object is (bAbI tasks 1-3 style).

An `Example` holds the `prompt` (text ending right before the answer), the short `answer` and metadata:
`length = len(prompt) + len(answer)` characters (all texts are ASCII, so characters = bytes = tokens of the byte
tokenizer; a training sequence adds `<s>` and `</s>`), and `needle_distance`: how many positions before the last
prompt token the needle's last character sits. With a sliding attention window of W tokens (the token itself
included), the needle is out of the window when the answer's first token is predicted iff needle_distance >= W.
Lengths are exact and the needle lands exactly at the distance asked.

Splits ("train", "validation", "test") draw their keys and values from disjoint pools (a hash of the word
decides its split): passkey names and codes, recall and mqar keys and values, bAbI people and objects. bAbI places
are the answers and are shared by all splits.
"""

import hashlib
import random
from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    """One task instance. `prompt + answer` is the full text; the needle is `prompt[needle_start:needle_end]`."""

    task: str
    split: str
    prompt: str
    answer: str
    length: int = field(init=False)
    needle_distance: int = field(init=False)
    needle_start: int
    needle_end: int

    def __post_init__(self):
        self.length = len(self.prompt) + len(self.answer)
        self.needle_distance = len(self.prompt) - self.needle_end


def answer_is_correct(example: Example, generated_text: str) -> bool:
    """Exact match: the generated text (leading whitespace ignored) starts with the answer, and the answer is not
    the start of a longer word or number ("48213" does not accept "482130")."""
    text = generated_text.lstrip()
    following = text[len(example.answer) : len(example.answer) + 1]
    return text.startswith(example.answer) and not following.isalnum()


def split_of(word: str) -> str:
    """The split a key or value belongs to: 80% train, 10% validation, 10% test, by a stable hash."""
    bucket = int(hashlib.md5(word.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def draw(rng: random.Random, split: str, make_word, exclude=()) -> str:
    """A word from `make_word(rng)` that belongs to `split` and is not in `exclude` (rejection sampling)."""
    while True:
        word = make_word(rng)
        if split_of(word) == split and word not in exclude:
            return word


# ----------------------------------------------------------------------------------------------------------------
# Filler: neutral sentences, and text of an exact number of characters
# ----------------------------------------------------------------------------------------------------------------

# No digits, no names, no "=" and none of the bAbI places or objects, so the filler never looks like a needle.
FILLER_SUBJECTS = (
    "The old bridge", "A small boat", "The quiet river", "A tall pine", "The grey cloud", "A lone heron",
    "The narrow road", "A warm breeze", "The distant hill", "A brown fox", "The morning mist", "A slow barge",
    "The stone wall", "A wild goose", "The silver lake",
)  # fmt: skip
FILLER_VERBS = (
    "rests near", "drifts past", "stands beside", "leans toward", "waits by", "looks over", "hides behind",
    "turns toward", "follows", "passes",
)  # fmt: skip
FILLER_COMPLEMENTS = (
    "the green meadow", "a wooden fence", "the far shore", "an empty field", "the dark forest", "a quiet village",
    "the open valley", "a shallow stream", "the sandy dunes", "an old mill", "the winding path", "a rocky cliff",
)  # fmt: skip
# Words of every length from 1 to 10, to build a sentence of any exact length.
WORDS_BY_LENGTH = {
    1: ("a",),
    2: ("by", "on", "up", "so"),
    3: ("sun", "sky", "dew", "elm"),
    4: ("wind", "rain", "moss", "fern"),
    5: ("cloud", "stone", "brook", "grass"),
    6: ("meadow", "willow", "breeze", "pebble"),
    7: ("thunder", "sparrow", "drizzle", "bramble"),
    8: ("twilight", "snowfall", "moonbeam", "seashell"),
    9: ("starlight", "woodlands", "raindrops", "sunflower"),
    10: ("wildflower", "riverstone", "cloudburst", "nightshade"),
}
LONGEST_WORD = max(WORDS_BY_LENGTH)


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_VERBS)} {rng.choice(FILLER_COMPLEMENTS)}."


def measured_sentence(rng: random.Random, num_chars: int) -> str:
    """Exactly `num_chars` (>= 3) characters: "Words in a row. " (loose words, ending in a period and a space)."""
    remaining = num_chars - 2  # characters of words and the spaces between them
    words = []
    while remaining > LONGEST_WORD:
        word = rng.choice(WORDS_BY_LENGTH[rng.randint(1, min(LONGEST_WORD, remaining - 2))])
        words.append(word)
        remaining -= len(word) + 1
    words.append(rng.choice(WORDS_BY_LENGTH[remaining]))
    text = " ".join(words)
    return text[0].upper() + text[1:] + ". "


def fill(rng: random.Random, num_chars: int, propose=filler_sentence, accept=None) -> str:
    """Exactly `num_chars` characters of sentences, each followed by one space.

    `propose(rng)` gives the next sentence (anything whose `str()` is the sentence); `accept(sentence)` is called
    for each one kept (the bAbI world applies its events there). A sentence that would leave 1 or 2 characters
    free is not kept; the last few characters become one `measured_sentence` (or spaces below 3 characters).
    """
    if num_chars < 3:
        return " " * num_chars
    pieces, remaining = [], num_chars
    while True:
        candidate = propose(rng)
        text = str(candidate) + " "
        if remaining - len(text) < 3 and remaining != len(text):
            break
        pieces.append(text)
        remaining -= len(text)
        if accept is not None:
            accept(candidate)
        if remaining == 0:
            return "".join(pieces)
    return "".join(pieces) + measured_sentence(rng, remaining)


def check_distance(task: str, length: int, needle_distance: int | None, lowest: int, highest: int):
    if lowest > highest:
        raise ValueError(
            f"length={length} is too short for the {task} task: it needs at least {length + lowest - highest}."
        )
    if needle_distance is not None and not lowest <= needle_distance <= highest:
        raise ValueError(
            f"needle_distance={needle_distance} does not fit the {task} task at length={length}: "
            f"choose a distance from {lowest} to {highest}."
        )


def with_needle(task, split, head, before_len, needle, separator, after, question, answer, rng, lead_in="") -> Example:
    """Example whose prompt is head + filler(before_len) + lead_in + needle + separator + after + question."""
    before = head + fill(rng, before_len) + lead_in
    prompt = before + needle + separator + after + question
    return Example(task, split, prompt, answer, needle_start=len(before), needle_end=len(before) + len(needle))


# ----------------------------------------------------------------------------------------------------------------
# passkey
# ----------------------------------------------------------------------------------------------------------------

NAME_SYLLABLES = (
    "ka", "lo", "mi", "ra", "ten", "vor", "zu", "bel", "dor", "fin", "gal", "hu", "is", "jo", "ne", "pa",
    "quil", "ros", "sa", "tor", "ul", "ven", "wy", "xan", "yor",
)  # fmt: skip
LONGEST_NAME = 3 * max(len(s) for s in NAME_SYLLABLES)


def random_name(rng: random.Random) -> str:
    """A made-up name of 2 or 3 syllables ("Belmira"): never a word of the filler."""
    return "".join(rng.choice(NAME_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


class PasskeyTask:
    """Needle "The secret code for <name> is <digits>." at the distance asked, in filler; question at the end."""

    name = "passkey"
    head = "A secret code is hidden in the text below. Find it and remember it.\n"
    needle_text = "The secret code for {name} is {code}."
    question_text = "\nWhat is the secret code for {name}? Answer: "
    separator = " "

    def __init__(self, digits: int = 5):
        if not (isinstance(digits, int) and digits >= 1):
            raise ValueError(f"digits={digits!r}: the secret code needs at least one digit.")
        self.digits = digits

    def distance_range(self, length: int) -> tuple[int, int]:
        longest = "x" * LONGEST_NAME
        lowest = len(self.separator) + len(self.question_text.format(name=longest))
        needle = self.needle_text.format(name=longest, code="0" * self.digits)
        return lowest, length - self.digits - len(self.head) - len(needle)

    def make(self, rng: random.Random, split: str, length: int, needle_distance: int) -> Example:
        name = draw(rng, split, random_name)
        code = draw(rng, split, lambda r: str(r.randrange(10 ** (self.digits - 1), 10**self.digits)))
        needle = self.needle_text.format(name=name, code=code)
        question = self.question_text.format(name=name)
        after = fill(rng, needle_distance - len(self.separator) - len(question))
        before_len = length - len(code) - len(self.head) - len(needle) - needle_distance
        return with_needle(self.name, split, self.head, before_len, needle, self.separator, after, question, code, rng)


# ----------------------------------------------------------------------------------------------------------------
# recall
# ----------------------------------------------------------------------------------------------------------------

KEY_CONSONANTS = "bdfghjklmnprstvz"
KEY_VOWELS = "aeiou"


def random_key(rng: random.Random) -> str:
    """A three-letter key, consonant-vowel-consonant ("kib")."""
    return rng.choice(KEY_CONSONANTS) + rng.choice(KEY_VOWELS) + rng.choice(KEY_CONSONANTS)


class RecallTask:
    """`num_pairs` lines `key=value` (the needle block), a gap, then the values of `num_queries` of the keys.

    `needle_distance` is measured from the end of the block: every queried pair lies at least that far back.
    """

    name = "recall"
    lead_in = "Remember the value of each key:\n"  # right before the block, so the block starts on a new line
    separator = "\n"

    def __init__(self, num_pairs: int = 8, num_queries: int = 2):
        if not (isinstance(num_pairs, int) and isinstance(num_queries, int) and 1 <= num_queries <= num_pairs):
            raise ValueError(f"num_pairs={num_pairs!r}, num_queries={num_queries!r}: need 1 <= num_queries <= num_pairs.")
        self.num_pairs, self.num_queries = num_pairs, num_queries

    def question(self, keys: list[str]) -> str:
        listed = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
        return f"\nQuestion: What are the values of {listed}? Answer: "

    def answer(self, keys: list[str], values: list[str]) -> str:
        return " ".join(values)

    def distance_range(self, length: int) -> tuple[int, int]:
        block_len = self.num_pairs * len("kib=417\n") - 1
        asked_keys, asked_values = ["kib"] * self.num_queries, ["417"] * self.num_queries
        answer_len = len(self.answer(asked_keys, asked_values))
        lowest = len(self.separator) + len(self.question(asked_keys))
        return lowest, length - answer_len - len(self.lead_in) - block_len

    def make(self, rng: random.Random, split: str, length: int, needle_distance: int) -> Example:
        keys, values = [], []
        for _ in range(self.num_pairs):
            keys.append(draw(rng, split, random_key, exclude=keys))
            values.append(draw(rng, split, lambda r: str(r.randrange(100, 1000)), exclude=values))
        block = "\n".join(f"{key}={value}" for key, value in zip(keys, values))
        asked = rng.sample(range(self.num_pairs), self.num_queries)
        asked_keys = [keys[i] for i in asked]
        question = self.question(asked_keys)
        answer = self.answer(asked_keys, [values[i] for i in asked])
        after = fill(rng, needle_distance - len(self.separator) - len(question))
        before_len = length - len(answer) - len(self.lead_in) - len(block) - needle_distance
        return with_needle(
            self.name, split, "", before_len, block, self.separator, after, question, answer, rng, self.lead_in
        )


class KeyedRecallTask(RecallTask):
    """`recall` asked in the block's own form, as in the multi-query associative recall of Zoology (Arora et al.,
    2023): the question lists the keys, then each value is asked for right after its key and `=`, exactly as it
    was written in the block ("Values of kib, dor:\nkib=" -> "417\ndor=582"). The answer repeats the second and
    later keys, copied from the question a few tokens back; every value follows the same bytes it followed when it
    was written, so a memory written with the key's bytes as the key can be read with them."""

    name = "mqar"

    def question(self, keys: list[str]) -> str:
        return f"\nValues of {', '.join(keys)}:\n{keys[0]}="

    def answer(self, keys: list[str], values: list[str]) -> str:
        lines = "\n".join(f"{key}={value}" for key, value in zip(keys, values))
        return lines[len(keys[0]) + 1 :]  # the first key and its "=" end the prompt


# ----------------------------------------------------------------------------------------------------------------
# babi: a small world simulator
# ----------------------------------------------------------------------------------------------------------------

PLACES = ("kitchen", "garden", "hallway", "bedroom", "bathroom", "office", "cellar", "garage")
PEOPLE = (
    "Mary John Sandra Daniel Emma Oliver Lucy Henry Grace Jack Chloe Samuel Alice Peter Nina Oscar Ruth Victor "
    "Hannah Leo Julia Simon Clara Hugo Ivy Felix Rosa Adam Maya Tom Eva Noah Lily Max Zoe Paul Anna Ben Iris "
    "Carl Dora Ethan Fiona Gus Helen Ian Jane Kurt Laura Mark Nora Owen Paula Quinn Rita Sam Tara Umar Vera Will"
).split()
THINGS = (
    "apple football milk book key umbrella pencil wallet lamp ball cup hat scarf guitar camera phone bottle kite "
    "ticket map candle basket spoon plate glove ring clock radio shoe bucket brush coin drum flute jar mug rope "
    "sock towel pillow blanket hammer ladder violin compass helmet kettle mirror notebook saucer teapot whistle "
    "backpack lantern marble parcel"
).split()
MOVE = ("{person} went to the {place}.", "{person} moved to the {place}.", "{person} walked to the {place}.",
        "{person} travelled to the {place}.", "{person} journeyed to the {place}.", "{person} ran to the {place}.")  # fmt: skip
PICK_UP = ("{person} picked up the {thing}.", "{person} took the {thing}.", "{person} grabbed the {thing}.",
           "{person} got the {thing}.")  # fmt: skip
DROP = ("{person} dropped the {thing}.", "{person} put down the {thing}.", "{person} left the {thing}.",
        "{person} discarded the {thing}.")  # fmt: skip
GIVE = ("{person} gave the {thing} to {recipient}.", "{person} handed the {thing} to {recipient}.",
        "{person} passed the {thing} to {recipient}.")  # fmt: skip
DISTRACT = ("{person} yawned.", "{person} laughed.", "{person} hummed a tune.", "{person} looked out of the window.",
            "{person} thought about the weekend.", "{person} sat down for a while.", "{person} checked the time.",
            "{person} sneezed.", "{person} wondered what to cook.")  # fmt: skip
EVENT_WEIGHTS = {"move": 3, "pick_up": 2, "drop": 1, "give": 1, "distract": 2, "filler": 1}


@dataclass(frozen=True)
class Event:
    """One sentence of a story and what it does to the world (`kind` "distract" and "filler" do nothing)."""

    kind: str
    text: str
    person: str | None = None
    place: str | None = None
    thing: str | None = None
    recipient: str | None = None

    def __str__(self):
        return self.text


class World:
    """Who is where and who holds what. People start nowhere known; objects start unseen (picked up where the
    person stands) and afterwards are held or lie where they were dropped."""

    def __init__(self, people: list[str], things: list[str]):
        self.people, self.things = people, things
        self.location = dict.fromkeys(people)  # person -> place or None (not yet seen)
        self.holder = dict.fromkeys(things)  # thing -> person or None
        self.lying = dict.fromkeys(things)  # thing -> place where it lies, or None (unseen, or held)

    def copy(self) -> "World":
        world = World(self.people, self.things)
        world.location, world.holder, world.lying = dict(self.location), dict(self.holder), dict(self.lying)
        return world

    def where(self, entity: str) -> str | None:
        if entity in self.location:
            return self.location[entity]
        holder = self.holder[entity]
        return self.location[holder] if holder is not None else self.lying[entity]

    def apply(self, event: Event):
        if event.kind == "move":
            self.location[event.person] = event.place
        elif event.kind == "pick_up":
            self.holder[event.thing], self.lying[event.thing] = event.person, None
        elif event.kind == "drop":
            self.holder[event.thing], self.lying[event.thing] = None, self.location[event.person]
        elif event.kind == "give":
            self.holder[event.thing] = event.recipient

    def move(self, rng, person: str, place: str) -> Event:
        return Event("move", rng.choice(MOVE).format(person=person, place=place), person=person, place=place)

    def pick_up(self, rng, person: str, thing: str) -> Event:
        return Event("pick_up", rng.choice(PICK_UP).format(person=person, thing=thing), person=person, thing=thing)

    def random_event(self, rng: random.Random) -> Event:
        """A random event that is possible in the current state."""
        located = [p for p in self.people if self.location[p] is not None]
        can_pick = [
            (p, t)
            for p in located
            for t in self.things
            if self.holder[t] is None and self.lying[t] in (None, self.location[p])
        ]
        held = [t for t in self.things if self.holder[t] is not None]
        can_give = [
            (t, q)
            for t in held
            for q in self.people
            if q != self.holder[t] and self.location[q] == self.location[self.holder[t]]
        ]
        options = {"move": True, "pick_up": can_pick, "drop": held, "give": can_give, "distract": True, "filler": True}
        kinds = [kind for kind, possible in options.items() if possible]
        kind = rng.choices(kinds, weights=[EVENT_WEIGHTS[k] for k in kinds])[0]
        person = rng.choice(self.people)
        if kind == "move":
            return self.move(rng, person, rng.choice([p for p in PLACES if p != self.location[person]]))
        if kind == "pick_up":
            return self.pick_up(rng, *rng.choice(can_pick))
        if kind == "drop":
            thing = rng.choice(held)
            text = rng.choice(DROP).format(person=self.holder[thing], thing=thing)
            return Event("drop", text, person=self.holder[thing], thing=thing)
        if kind == "give":
            thing, recipient = rng.choice(can_give)
            person = self.holder[thing]
            text = rng.choice(GIVE).format(person=person, thing=thing, recipient=recipient)
            return Event("give", text, person=person, thing=thing, recipient=recipient)
        if kind == "distract":
            return self.distraction(rng)
        return Event("filler", filler_sentence(rng))

    def distraction(self, rng: random.Random) -> Event:
        """A sentence about someone that changes nothing."""
        return Event("distract", rng.choice(DISTRACT).format(person=rng.choice(self.people)))


def longest(templates, **values) -> int:
    """Length of the longest sentence the templates give with the longest value of each field."""
    return max(len(t.format(**{k: max(v, key=len) for k, v in values.items()})) for t in templates)


class BabiTask:
    """A story of `num_people` people and `num_things` objects; the question "Where is X?" asks about a person or
    an object. The needle is the sentence that last changed the answer: the person's last move, or the last move
    of the person carrying the object. Nothing after the needle changes the answer (events that would are not
    told), so a model must carry that sentence, and for objects also who picked the object up, across the gap."""

    name = "babi"
    separator = " "

    def __init__(self, num_people: int = 4, num_things: int = 3):
        if not (isinstance(num_people, int) and isinstance(num_things, int) and num_people >= 1 and num_things >= 1):
            raise ValueError(f"num_people={num_people!r}, num_things={num_things!r}: need at least one of each.")
        self.num_people, self.num_things = num_people, num_things
        for split in SPLITS:
            for pool, needed in ((PEOPLE, num_people), (THINGS, num_things)):
                available = sum(split_of(word) == split for word in pool)
                if available < needed:
                    raise ValueError(f"The {split} split has only {available} distinct words for {needed} asked.")
        # At most three forced sentences (go to the object, pick it up, leave the answer's place) and the needle.
        self.longest_event = longest(MOVE + PICK_UP, person=PEOPLE, place=PLACES, thing=THINGS) + 1
        self.forced_room = 4 * self.longest_event

    @staticmethod
    def question(entity: str) -> str:
        return f"\nQuestion: Where is {entity if entity in PEOPLE else 'the ' + entity}? Answer: "

    def distance_range(self, length: int) -> tuple[int, int]:
        longest_question = max(len(self.question(e)) for e in PEOPLE + THINGS)
        return len(self.separator) + longest_question, length - max(map(len, PLACES)) - self.forced_room

    def make(self, rng: random.Random, split: str, length: int, needle_distance: int) -> Example:
        people = rng.sample([p for p in PEOPLE if split_of(p) == split], self.num_people)
        things = rng.sample([t for t in THINGS if split_of(t) == split], self.num_things)
        world = World(people, things)
        entity = rng.choice(people + things)
        answer = rng.choice(PLACES)
        question = self.question(entity)

        story = fill(rng, length - len(answer) - needle_distance - self.forced_room, world.random_event, world.apply)
        leading_up = self.lead_up_to_needle(rng, world, entity, answer)
        for event in leading_up:
            world.apply(event)
        needle = leading_up.pop().text
        forced = "".join(f"{event} " for event in leading_up)
        story += fill(rng, self.forced_room - len(forced) - len(needle), world.distraction) + forced

        def keeps_answer(r: random.Random) -> Event:
            """A random event that leaves `entity` where it is (a distraction if none turns up)."""
            for _ in range(100):
                event = world.random_event(r)
                trial = world.copy()
                trial.apply(event)
                if trial.where(entity) == answer:
                    return event
            return world.distraction(r)

        after = fill(rng, needle_distance - len(self.separator) - len(question), keeps_answer, world.apply)
        prompt = story + needle + self.separator + after + question
        return Example(self.name, split, prompt, answer, needle_start=len(story), needle_end=len(story) + len(needle))

    @staticmethod
    def lead_up_to_needle(rng, world: World, entity: str, answer: str) -> list[Event]:
        """The events that bring `entity` to `answer`; the last one (the needle) is a move into `answer`. An
        object moves with its carrier: if nobody holds it, someone first goes to it and picks it up."""
        trial, events = world.copy(), []

        def happen(event: Event):
            trial.apply(event)
            events.append(event)

        elsewhere = [place for place in PLACES if place != answer]
        mover = entity
        if entity in trial.holder:
            mover = trial.holder[entity]
            if mover is None:
                mover = rng.choice(trial.people)
                lies_at = trial.lying[entity]  # None: not seen yet, so it is found wherever the mover stands
                if lies_at is not None and trial.location[mover] != lies_at:
                    happen(world.move(rng, mover, lies_at))
                elif lies_at is None and trial.location[mover] is None:
                    happen(world.move(rng, mover, rng.choice(elsewhere)))
                happen(world.pick_up(rng, mover, entity))
        if trial.location[mover] == answer:
            happen(world.move(rng, mover, rng.choice(elsewhere)))
        happen(world.move(rng, mover, answer))
        return events


TASK_TYPES = {task.name: task for task in (PasskeyTask, RecallTask, KeyedRecallTask, BabiTask)}
TASKS = tuple(TASK_TYPES)


def get_task(task: str, **options):
    if task not in TASK_TYPES:
        raise ValueError(f"Unknown task {task!r}; available: {', '.join(TASKS)}.")
    return TASK_TYPES[task](**options)


def minimum_length(task: str, **options) -> int:
    """The shortest `length` (characters of prompt + answer) every example of `task` fits in."""
    lowest, highest = get_task(task, **options).distance_range(0)
    return lowest - highest  # highest grows one for one with the length


def shortest_sequence(task: str) -> int:
    """The shortest sequence of `task` a model trains or is scored on: `minimum_length` plus `<s>` and `</s>`."""
    return minimum_length(task) + 2


def needle_distance_range(task: str, length: int, **options) -> tuple[int, int]:
    """The needle distances every example of `task` at `length` can take (inclusive); ValueError if none."""
    lowest, highest = get_task(task, **options).distance_range(length)
    check_distance(task, length, None, lowest, highest)
    return lowest, highest


def generate_example(
    task: str, split: str, index: int, length: int, seed: int = 0, needle_distance: int | None = None, **options
) -> Example:
    """Example number `index` of `generate_examples(task, split, ..., length, seed, needle_distance)`, made alone.

    Each example has its own random stream, so any example can be made on demand (training data is generated
    lazily) and the first n examples do not depend on how many are asked for."""
    return generate_examples(task, split, 1, length, seed, needle_distance, first_index=index, **options)[0]


def generate_examples(
    task: str,
    split: str,
    num_examples: int,
    length: int,
    seed: int = 0,
    needle_distance: int | None = None,
    first_index: int = 0,
    **options,
) -> list[Example]:
    """`num_examples` examples of `task` from `split`, each exactly `length` characters (prompt + answer).

    `needle_distance=None` places each needle uniformly at random over the distances the length allows
    (`needle_distance_range`). Task options: passkey `digits=5`; recall and mqar `num_pairs=8, num_queries=2`;
    babi `num_people=4, num_things=3`. The same arguments always give the same examples.
    """
    spec = get_task(task, **options)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; available: {', '.join(SPLITS)}.")
    if not (isinstance(length, int) and length >= 1):
        raise ValueError(f"length={length!r} must be a positive integer (characters of prompt + answer).")
    lowest, highest = spec.distance_range(length)
    check_distance(task, length, needle_distance, lowest, highest)
    examples = []
    for index in range(first_index, first_index + num_examples):
        rng = random.Random(f"{task}/{split}/{seed}/{index}")
        distance = needle_distance if needle_distance is not None else rng.randint(lowest, highest)
        examples.append(spec.make(rng, split, length, distance))
    return examples


__all__ = [
    "Example",
    "SPLITS",
    "TASKS",
    "answer_is_correct",
    "generate_example",
    "generate_examples",
    "minimum_length",
    "needle_distance_range",
]
