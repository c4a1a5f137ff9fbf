"""The fast run.yaml emitter writes exactly what libyaml writes, or declines."""

from __future__ import annotations

import random

import yaml

from expman._cli.listing import summary_fields
from expman._storage.layout import dump_yaml, parse_yaml_mapping
from expman._storage.yaml_emit import emit


def _libyaml(data: dict) -> str:
    return yaml.dump(data, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True)


RUN_YAML = {
    "id": "fe6a05e41471", "name": "lr-0.1", "experiment": "sweep", "status": "running",
    "started_at": "2026-12-07T21:52:07.927+00:00", "ended_at": None, "duration_s": 20.018,
    "tags": [], "parent": None, "children": ["a1", "b2"], "world_size": 2, "hosts": ["vm", "node-2.local"],
    "ranks": {
        0: {"host": "vm", "pid": 11033, "local_rank": 0, "node_rank": 0, "status": "running",
            "started_at": "2026-12-07T21:52:07.927+00:00", "ended_at": None,
            "last_heartbeat": "2026-12-07T21:52:07.937+00:00", "last_step": 1999},
        1: {"host": "node-2.local", "pid": 7, "status": "lost", "last_step": None,
            "error": {"type": "Lost", "message": "the training process exited without finishing"}},
    },
    "launcher": "torchrun", "job": {"id": "123", "array": None},
    "software": {"expman": "0.1.0", "python": "3.11.7", "platform": "Linux-6.18.44-x86_64-with-glibc2.36",
                 "executable": "/usr/bin/python3", "argv": ["train.py", "--lr", "0.1", "-c", "a b", "", "1",
                                                                 "train.py --data /datasets/imagenet/train --epochs 90 --lr 0.1 --batch-size 256"],
                 "cwd": "/home/me/here"},
    "code": {"git": {"commit": "25d49b8e11b7555ff89ce2258fdbef1997f8930d", "dirty": True, "remote": None,
                     "diff_bytes": 17097}},
    "param_conflicts": {"lr": {0: 0.1, 1: 1e-05}, "yes": {0: "no", 1: "~"}},
    "reopened_at": ["2026-12-07T22:00:00.000+00:00"], "nested": [[1, [2, {}]], {"a": [], "b": {"c": [1.5e20]}}],
    "floats": [0.0, -0.0, 1e16, float("inf"), float("-inf"), 3.0],
}


def test_a_run_yaml_is_written_as_libyaml_writes_it_and_read_back():
    text = emit(RUN_YAML)
    assert text is not None, "the emitter vouches for a usual run.yaml"
    assert text == _libyaml(RUN_YAML)
    assert parse_yaml_mapping(text, "run.yaml") == yaml.safe_load(_libyaml(RUN_YAML))
    assert summary_fields(text, "run.yaml")["status"] == "running"  # `expman ls`'s line scan reads it too
    assert dump_yaml(RUN_YAML) == text


def test_what_it_cannot_vouch_for_goes_to_libyaml():
    for odd in ({"a": "é"}, {"a": "two\nlines"}, {"a": (1, 2)}, {True: 1},
                {"a": " padded"}, {"a": "it's"}, {"a": "x: y"}, {}, {"k" * 200: 1}):
        assert emit(odd) is None, odd
        assert dump_yaml(odd) == _libyaml(odd)


_TAME = list("ab01.-_/+ ") + ["yes", "null", "1e3", "0x1F", "2026-12-07", "12:30", ".inf", "~", "it"]  # words YAML reads as other types
_ALPHABET = list("ab01.-_/+: #'\"~!&*?|>%@`,[]{}=<") + ["yes", "null", "1e3", "0x1F", "2026-12-07", ".inf", " "]


def _random_value(rng: random.Random, depth: int) -> object:
    pick = rng.random()
    if depth < 3 and pick < 0.15:
        return {_random_key(rng): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if depth < 3 and pick < 0.3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick < 0.4:
        return rng.choice([None, True, False, 0, -7, 2**70, 1.5, -2e-9, 1e300, float("nan")])
    if pick < 0.5:  # long: libyaml folds it past 80 columns
        words = ["ab", "-c", "x/y.py", "12", "--lr", "0.1"] + (["a:b", "it's", "", "#"] if rng.random() < 0.2 else [])
        return " ".join(rng.choice(words) for _ in range(rng.randrange(60)))
    alphabet = _ALPHABET if rng.random() < 0.3 else _TAME
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def _random_key(rng: random.Random) -> object:
    return rng.randrange(100) if rng.random() < 0.2 else str(_random_value(rng, 9))


def _has_long_text(value: object) -> bool:
    if isinstance(value, dict):
        return any(_has_long_text(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_long_text(v) for v in value)
    return isinstance(value, str) and len(value) > 80 and " " in value


def test_random_documents_match_libyaml_whenever_the_emitter_answers():
    rng = random.Random(20)
    answered = folded = 0
    for _ in range(5000):
        doc = {_random_key(rng): _random_value(rng, 0) for _ in range(1 + rng.randrange(5))}
        text = emit(doc)
        if text is not None:
            answered += 1
            folded += _has_long_text(doc)
            assert text == _libyaml(doc), doc
    assert answered > 500, "documents of plain values take the fast path"
    assert folded > 50, "long strings folded as libyaml folds them"
