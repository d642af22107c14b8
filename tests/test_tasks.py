"""The built-in long-context tasks: deterministic, exact lengths, needles where asked, correct answers, disjoint
splits. Answers and needle positions are checked by parsers written here from the task descriptions, not by the
generators' own bookkeeping (the bAbI story is re-simulated sentence by sentence)."""

import re

import pytest

from modeling_titans.evaluation import default_distances
from modeling_titans.tasks import (
    SPLITS,
    TASKS,
    answer_is_correct,
    generate_example,
    generate_examples,
    minimum_length,
    needle_distance_range,
)

# ---------------------------------------------------------------------------------------------------------------
# Independent parsers: each returns (expected answer, end offset of the needle in the prompt, keys, values)
# ---------------------------------------------------------------------------------------------------------------


def parse_passkey(prompt):
    needles = list(re.finditer(r"The secret code for ([A-Z][a-z]+) is (\d+)\.", prompt))
    assert len(needles) == 1, "exactly one needle sentence"
    asked = re.search(r"\nWhat is the secret code for ([A-Z][a-z]+)\? Answer: $", prompt)
    assert asked and asked.group(1) == needles[0].group(1), "the question names the needle's key"
    assert not re.search(r"\d", prompt[: needles[0].start()] + prompt[needles[0].end() :]), "digits only in the needle"
    name, code = needles[0].groups()
    return code, needles[0].end(), {name}, {code}


def parse_block(prompt):
    """The `key=value` lines of a recall or mqar prompt: {key: value} and the end offset of the last line."""
    pairs = list(re.finditer(r"^([a-z]{3})=(\d{3})$", prompt, flags=re.MULTILINE))
    table = {m.group(1): m.group(2) for m in pairs}
    assert len(table) == len(pairs) == 8, "eight pairs with distinct keys"
    assert len(set(table.values())) == 8, "distinct values"
    return table, pairs[-1].end()


def parse_recall(prompt):
    table, block_end = parse_block(prompt)
    asked = re.search(r"\nQuestion: What are the values of ([a-z, ]+)\? Answer: $", prompt)
    keys = re.split(r", | and ", asked.group(1))
    assert len(keys) == 2 and len(set(keys)) == 2
    return " ".join(table[k] for k in keys), block_end, set(table), set(table.values())


def parse_mqar(prompt):
    table, block_end = parse_block(prompt)
    asked = re.search(r"\nValues of ([a-z]{3}), ([a-z]{3}):\n([a-z]{3})=$", prompt)
    first, second, repeated = asked.groups()
    assert first != second and repeated == first, "the prompt ends with the first key asked and its ="
    answer = f"{table[first]}\n{second}={table[second]}"
    return answer, block_end, set(table), set(table.values())


MOVE = re.compile(r"(\w+) (?:went|moved|walked|travelled|journeyed|ran) to the (\w+)")
PICK_UP = re.compile(r"(\w+) (?:picked up|took|grabbed|got) the (\w+)")
DROP = re.compile(r"(\w+) (?:dropped|put down|left|discarded) the (\w+)")
GIVE = re.compile(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)")


def parse_babi(prompt):
    """Re-simulates the story, checking every action is possible, and finds the last sentence that changed the
    answer (the needle)."""
    story, question = prompt.split("\nQuestion: ")
    entity = re.fullmatch(r"Where is (?:the )?(\w+)\? Answer: ", question).group(1)
    location, holder, lying = {}, {}, {}

    def where(x):
        if x in holder:
            return location.get(holder[x])
        return location.get(x, lying.get(x))

    people, things = set(), set()
    answer, needle_end = None, None
    for sentence in re.finditer(r"([^.]+)\.", story):
        text = sentence.group(1).strip()
        if m := MOVE.fullmatch(text):
            person, place = m.groups()
            assert location.get(person) != place, "a move goes somewhere else"
            location[person] = place
            people.add(person)
        elif m := PICK_UP.fullmatch(text):
            person, thing = m.groups()
            assert person in location, "only someone whose place is known picks something up"
            assert thing not in holder and lying.get(thing, location[person]) == location[person]
            holder[thing] = person
            lying.pop(thing, None)
            people.add(person)
            things.add(thing)
        elif m := DROP.fullmatch(text):
            person, thing = m.groups()
            assert holder.get(thing) == person, "only the holder drops a thing"
            del holder[thing]
            lying[thing] = location[person]
        elif m := GIVE.fullmatch(text):
            person, thing, recipient = m.groups()
            assert holder.get(thing) == person and location.get(recipient) == location[person]
            holder[thing] = recipient
            people.add(recipient)
        if where(entity) != answer:
            answer, needle_end = where(entity), sentence.end()
    assert answer is not None
    return answer, needle_end, people, things


PARSERS = {"passkey": parse_passkey, "recall": parse_recall, "mqar": parse_mqar, "babi": parse_babi}


def check_example(example, length):
    answer, needle_end, _, _ = PARSERS[example.task](example.prompt)
    assert example.answer == answer
    assert example.length == len(example.prompt) + len(example.answer) == length
    assert example.prompt.isascii() and example.answer.isascii()
    assert example.needle_end == needle_end
    assert example.needle_distance == len(example.prompt) - needle_end


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_examples_other_seed_other_examples(task):
    first = generate_examples(task, "train", 4, 400, seed=3)
    assert first == generate_examples(task, "train", 4, 400, seed=3)
    other = generate_examples(task, "train", 4, 400, seed=4)
    assert all(a.prompt != b.prompt for a, b in zip(first, other))
    # Example i does not depend on how many are asked for, and can be made alone.
    assert generate_examples(task, "train", 2, 400, seed=3) == first[:2]
    assert generate_example(task, "train", 3, 400, seed=3) == first[3]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", ["minimum", 256, 1000, 4096, 16384])
def test_answers_are_correct_and_lengths_exact(task, length):
    length = minimum_length(task) if length == "minimum" else length
    num_examples = 2 if length > 4096 else 12
    for example in generate_examples(task, "test", num_examples, length, seed=1):
        check_example(example, length)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [300, 2048])
def test_needles_land_at_the_distance_asked(task, length):
    lowest, highest = needle_distance_range(task, length)
    assert 0 < lowest < highest < length
    for distance in (lowest, lowest + 1, (lowest + highest) // 2, highest - 1, highest):
        for example in generate_examples(task, "validation", 3, length, seed=2, needle_distance=distance):
            check_example(example, length)
            assert example.needle_distance == distance


@pytest.mark.parametrize("task", TASKS)
def test_default_distances_are_the_nearest_middle_and_farthest_needle(task):
    for length in (300, 16384):
        lowest, highest = needle_distance_range(task, length - 2)  # the length counts <s> and </s>
        assert default_distances(task, length) == [lowest, (lowest + highest) // 2, highest]
    with pytest.raises(ValueError, match="does not fit"):
        default_distances(task, 10)


@pytest.mark.parametrize("task", TASKS)
def test_random_distances_spread_over_the_range(task):
    lowest, highest = needle_distance_range(task, 2000)
    distances = [e.needle_distance for e in generate_examples(task, "train", 40, 2000)]
    assert all(lowest <= d <= highest for d in distances)
    middle = (lowest + highest) / 2
    assert any(d < middle for d in distances) and any(d > middle for d in distances)


@pytest.mark.parametrize("task", TASKS)
def test_splits_have_disjoint_keys_and_values(task):
    seen = {}
    for split in SPLITS:
        keys, values = set(), set()
        for example in generate_examples(task, split, 60, minimum_length(task), seed=5):
            _, _, example_keys, example_values = PARSERS[task](example.prompt)
            keys |= example_keys
            values |= example_values
        seen[split] = (keys, values)
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not seen[a][0] & seen[b][0], f"{task}: keys shared by {a} and {b}"
            if task != "babi":  # bAbI's values are its places, the answers: shared by design
                assert not seen[a][1] & seen[b][1], f"{task}: values shared by {a} and {b}"


def test_task_options_change_the_examples():
    example = generate_examples("passkey", "train", 1, 300, digits=7)[0]
    assert re.fullmatch(r"\d{7}", example.answer)
    example = generate_examples("recall", "train", 1, 400, num_pairs=5, num_queries=3)[0]
    assert len(re.findall(r"^[a-z]{3}=\d{3}$", example.prompt, flags=re.MULTILINE)) == 5
    assert len(example.answer.split()) == 3
    example = generate_examples("mqar", "train", 1, 400, num_pairs=5, num_queries=3)[0]
    assert len(re.findall(r"^[a-z]{3}=\d{3}$", example.prompt, flags=re.MULTILINE)) == 5
    assert re.fullmatch(r"\d{3}\n[a-z]{3}=\d{3}\n[a-z]{3}=\d{3}", example.answer)
    example = generate_examples("babi", "train", 1, 1000, num_people=2, num_things=1)[0]
    assert len(parse_babi(example.prompt)[2]) <= 2


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown task 'nope'; available: passkey, recall, mqar, babi"):
        generate_examples("nope", "train", 1, 300)
    with pytest.raises(ValueError, match="Unknown split"):
        generate_examples("passkey", "dev", 1, 300)
    shortest = minimum_length("passkey")
    with pytest.raises(ValueError, match=f"too short for the passkey task: it needs at least {shortest}"):
        generate_examples("passkey", "train", 1, shortest - 1)
    lowest, highest = needle_distance_range("recall", 500)
    with pytest.raises(ValueError, match=f"choose a distance from {lowest} to {highest}"):
        generate_examples("recall", "train", 1, 500, needle_distance=highest + 1)
    with pytest.raises(ValueError, match=f"choose a distance from {lowest} to {highest}"):
        generate_examples("recall", "train", 1, 500, needle_distance=lowest - 1)


def test_answer_is_correct_is_exact_match():
    example = generate_examples("passkey", "test", 1, 300)[0]
    code = example.answer
    assert answer_is_correct(example, code)
    assert answer_is_correct(example, " " + code + ".\nMore text")
    assert not answer_is_correct(example, code + "0")  # a longer number
    assert not answer_is_correct(example, code[:-1])
    assert not answer_is_correct(example, "x" + code)
