"""Synthetic task generators: sizing, needle placement, determinism and answers that are really right."""

import re
from collections import Counter

import pytest

from eval_fixtures import byte_tokenizer
from kvpress.eval.tasks import TASKS, available_tasks, get_task
from kvpress.eval.tasks.base import Rendered, build_prompt
from kvpress.eval.tasks.haystack import NEEDLE, NOISE, insert_at_depths

LENGTH = 1500


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _context(sample):
    """The haystack part of the prefix (between the instruction and the end of the prefix)."""
    return sample.prefix.split("\n\n", 1)[1]


@pytest.mark.parametrize("name", available_tasks())
def test_sample_fits_its_length_and_is_deterministic(tok, name):
    task = get_task(name)
    a = task.make_sample(tok, LENGTH, seed=3, index=1)
    b = get_task(name).make_sample(tok, LENGTH, seed=3, index=1)
    c = task.make_sample(tok, LENGTH, seed=3, index=2)
    assert a.prefix_ids == b.prefix_ids and a.suffix_ids == b.suffix_ids and a.references == b.references
    assert a.prefix_ids != c.prefix_ids
    assert a.prompt_tokens + a.max_new_tokens <= LENGTH
    # Filled up to the length: one more haystack unit (at most a 250-character prose sentence) would not fit.
    assert LENGTH - (a.prompt_tokens + a.max_new_tokens) < 260
    assert a.prefix_ids == tok(a.prefix, add_special_tokens=False)["input_ids"]
    # The question is in the suffix only; the chat turn ends and the assistant turn starts there.
    assert "<|im_end|>" in a.suffix and a.suffix.index("<|im_start|>assistant") > 0
    assert a.prefix.startswith("<|im_start|>user\n") and "<|im_end|>" not in a.prefix
    assert a.references and all(r.strip() for r in a.references)
    assert a.describe()["prompt_tokens"] == a.prompt_tokens and "prefix_ids" not in a.describe()


def test_too_short_length_raises(tok):
    with pytest.raises(ValueError, match="too small"):
        get_task("cwe").make_sample(tok, 300)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0, None])
def test_needle_sits_at_its_depth(tok, depth):
    sample = get_task("niah_single_noise").make_sample(tok, LENGTH, depth=depth, index=3)
    assert sample.depth == depth
    if depth is None:  # drawn at random, and recorded
        depth = sample.needle_depth
        assert 0.0 < depth < 1.0
    assert sample.needle_depth == depth
    context = _context(sample)
    needle = NEEDLE.format(key=re.search(r"for (\S+) mentioned", sample.suffix).group(1), value=sample.references[0])
    assert context.count(needle) == 1 and needle not in sample.suffix
    relative = context.index(needle) / (len(context) - len(needle))
    assert abs(relative - depth) <= (len(NOISE) + 1) / len(context) + 1e-9


def test_multikey_needles(tok):
    sample = get_task("niah_multikey_prose").make_sample(tok, LENGTH, index=4)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", sample.prefix)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    queried = [k for k, _ in needles if k in sample.suffix]
    assert len(queried) == 1 and sample.references == [v for k, v in needles if k == queried[0]]


def test_multivalue_and_multiquery(tok):
    mv = get_task("niah_multivalue_prose").make_sample(tok, LENGTH)
    key = re.search(r"for (\S+) mentioned", mv.suffix).group(1)
    assert sorted(mv.references) == sorted(re.findall(rf"numbers for {key} is: (\d+)\.", mv.prefix))
    assert len(set(mv.references)) == 4
    mq = get_task("niah_multiquery_prose").make_sample(tok, LENGTH)
    needles = dict(re.findall(r"numbers for (\S+) is: (\d+)\.", mq.prefix))
    assert len(needles) == 4 and all(k in mq.suffix for k in needles)
    assert sorted(mq.references) == sorted(needles.values())


def test_needle_haystack_is_all_distractors(tok):
    sample = get_task("niah_single_needles").make_sample(tok, LENGTH)
    key = re.search(r"for (\S+) mentioned", sample.suffix).group(1)
    needles = re.findall(r"numbers for (\S+) is: (\d+)\.", sample.prefix)
    assert len(needles) == sample.haystack_units + 1 > 10
    assert [v for k, v in needles if k == key] == sample.references
    assert NOISE not in sample.prefix


def test_variable_tracking_answer_follows_the_chain(tok):
    sample = get_task("vt").make_sample(tok, LENGTH, index=2)
    value = re.search(r"assigned the value (\d+) in", sample.suffix).group(1)
    holds: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.prefix):
        holds[name] = holds[rhs[4:]] if rhs.startswith("VAR ") else rhs  # assignments come in chain order
    assert sorted(n for n, v in holds.items() if v == value) == sorted(sample.references)
    assert len(sample.references) == 5


def test_common_words_answer_is_the_most_frequent(tok):
    task = get_task("cwe")
    sample = task.make_sample(tok, LENGTH, index=1)
    words = re.findall(r"^\d+\. (\S+)$", _context(sample), flags=re.M)
    counts = Counter(words)
    assert {w for w, _ in counts.most_common(10)} == set(sample.references)
    assert min(counts[w] for w in sample.references) == task.freq_common
    assert max(c for w, c in counts.items() if w not in sample.references) == task.freq_rare
    # substring scoring cannot credit a wrong word: no answer is part of another listed word
    assert not any(r != w and (r in w or w in r) for r in sample.references for w in counts)


def test_frequent_words_answer_is_the_top3(tok):
    sample = get_task("fwe").make_sample(tok, LENGTH, index=5)
    words = _context(sample).split()
    ranked = Counter(words).most_common()
    assert [w for w, _ in ranked[:3]] == sample.references
    assert ranked[2][1] > ranked[3][1]  # no tie at the cut for this seed


def test_prose_haystack_from_a_file(tok, tmp_path):
    text = " ".join(f"Sentence number {i} talks about the river and the hills." for i in range(200))
    path = tmp_path / "prose.txt"
    path.write_text(text)
    sample = get_task("niah_single_prose", haystack_file=str(path)).make_sample(tok, LENGTH)
    assert "talks about the river and the hills." in sample.prefix
    assert "special magic numbers for" in sample.prefix
    with pytest.raises(ValueError, match="too few sentences"):
        (tmp_path / "short.txt").write_text("Too short. Really.")
        get_task("niah_single_prose", haystack_file=str(tmp_path / "short.txt")).make_sample(tok, LENGTH)


def test_prompt_without_chat_template():
    plain = byte_tokenizer(chat=False)
    prefix, suffix = build_prompt(plain, "Instruction.", "CONTEXT", "Question?", "Answer:")
    assert prefix == "Instruction.\n\nCONTEXT" and suffix == "\n\nQuestion?\n\nAnswer:"
    sample = get_task("niah_single_noise").make_sample(plain, 800)
    assert sample.prefix.startswith("Some special magic numbers") and sample.suffix.endswith("text is")
    assert sample.prompt_tokens + sample.max_new_tokens <= 800


def test_insert_at_depths():
    units = ["aaaa", "bbbb", "cccc", "dddd"]
    assert insert_at_depths(units, [(0.0, "X")]) == "X aaaa bbbb cccc dddd"
    assert insert_at_depths(units, [(1.0, "X")]) == "aaaa bbbb cccc dddd X"
    assert insert_at_depths(units, [(0.5, "X"), (0.5, "Y")]) == "aaaa bbbb X Y cccc dddd"
    with pytest.raises(ValueError):
        insert_at_depths(units, [(1.5, "X")])


def test_registry():
    assert list(TASKS) == available_tasks() and len(available_tasks()) == 9
    assert get_task("NIAH-single-noise").name == "niah_single_noise"
    with pytest.raises(ValueError, match="unknown task"):
        get_task("qa_squad")


def test_check_rejects_a_missing_needle_and_an_overlong_prompt(tok):
    task = get_task("niah_single_noise")
    sample = task.make_sample(tok, 800)
    task.check(sample, Rendered("", "", "", ["1"], []))  # no needle to look for: passes
    with pytest.raises(AssertionError, match="missing from the context"):
        task.check(sample, Rendered("", "", "", ["1"], ["One of the special magic numbers for nobody is: 0."]))
    sample.length = sample.prompt_tokens  # no room left for the answer
    with pytest.raises(AssertionError, match="exceeds"):
        task.check(sample, Rendered("", "", "", ["1"], []))
