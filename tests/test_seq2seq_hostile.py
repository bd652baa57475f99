"""Hostile seq2seq files: one bad file per new field, each refused at load with one
NNBFormatError naming the problem (built by hand, tests/support/seq2seq.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

import nn2run
from nn2run import NNBFormatError
from nn2run.isa import ProgramError, validate
from support import seq2seq as s2s


def _set(path, value):
    def change(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return change


_DELETE = object()


def _ins(part, pc, ins):
    return _set(("decoder", part, pc), ins)


def _positional(regs):
    return _set(("decoder", "positional"), regs)


CASES = {
    # limits
    "no limits": (_set(("limits",), _DELETE), "limits must be"),
    "limits not an object": (_set(("limits",), [12, 10]), "limits must be"),
    "limits extra key": (_set(("limits", "memory"), 5), "limits must be"),
    "source limit zero": (_set(("limits", "source"), 0), "limits.source must be an integer in [1, 65536]"),
    "source limit giant": (_set(("limits", "source"), 1 << 40), "limits.source must be"),
    "target limit negative": (_set(("limits", "target"), -1), "limits.target must be"),
    "target limit a float": (_set(("limits", "target"), 10.0), "limits.target must be"),
    "target limit a bool": (_set(("limits", "target"), True), "limits.target must be"),
    # target
    "no target": (_set(("target",), _DELETE), "target must be"),
    "target begin wrong": (_set(("target", "begin"), 0), "target begin and end must be 4 and 5"),
    "target end wrong": (_set(("target", "end"), 4), "target begin and end must be 4 and 5"),
    "target codec bad": (_set(("target", "codec"), {"name": "char", "vocab": ["a", "a"]}), "duplicate"),
    # encoder
    "encoder logits not output": (lambda h: h["encoder"].update(logits=h["encoder"].pop("output")),
                                  "output register"),
    "encoder output width": (lambda h: (h["encoder"]["registers"].append(3),
                                        h["encoder"]["code"].append(["slice", 12, ["r", 11], 0]),
                                        h["encoder"].update(output=12)),
                             "output register must be written and have width 8"),
    "encoder softmaxj": (lambda h: h["encoder"]["code"].append(["softmaxj", 3, ["r", 2]]),
                        "only in a seq2seq decoder"),
    # memory and final
    "memory not positional": (_set(("decoder", "memory"), 10), "memory register must be per-position"),
    "memory out of range": (_set(("decoder", "memory"), 52), "memory register must be an integer in [0, 51]"),
    "memory width": (lambda h: h["decoder"]["registers"].__setitem__(0, 9),
                     "memory register must be per-position and have width 8"),
    "final positional": (_set(("decoder", "final"), 2), "final register must be plain"),
    "final is memory": (_set(("decoder", "final"), 0), "final register must be plain, not the memory"),
    "final missing": (_set(("decoder", "final"), _DELETE), "final register must be an integer"),
    # which registers are per-position
    "positional not a list": (_positional(0), "positional must be a list"),
    "positional duplicates": (_positional([0, 0, 2, 22, 23, 26, 28, 24, 27]), "distinct"),
    "positional out of range": (_positional([0, 2, 22, 23, 26, 28, 24, 27, 99]), "positional register must be"),
    "positional result declared plain": (_positional([0, 2, 23, 26, 28, 24, 27]), "register 22 must be per-position"),
    "plain result declared positional": (_positional([0, 2, 22, 23, 26, 28, 24, 27, 21]), "register 21 must be plain"),
    "state declared positional": (_positional([0, 2, 22, 23, 26, 28, 24, 27, 10]), "bad prev/next"),
    # prepare
    "prepare not a list": (_set(("decoder", "prepare"), {}), "prepare must be a list"),
    "prepare reads a step register": (_ins("prepare", 1, ["matmul", 3, ["r", 10], ["t", "l2.W_0"]]),
                                      "reads register 10 before it is written"),
    "prepare reads a code register": (_ins("prepare", 1, ["matmul", 3, ["r", 21], ["t", "l2.W_0"]]),
                                      "reads register 21 before it is written"),
    "prepare reads tokens": (_ins("prepare", 0, ["onehot", 2]), "reads a step's tokens"),
    "prepare writes memory": (_ins("prepare", 0, ["matmul", 0, ["r", 0], ["t", "l2.U_a"]]), "written twice"),
    # states and their initial values
    "init not written by prepare": (_set(("decoder", "states", 0, "init"), 21), "init register 21 must be"),
    "init out of range": (_set(("decoder", "states", 0, "init"), 4096), "init must be an integer"),
    "init positional": (_set(("decoder", "states", 0, "init"), 2), "init register 2 must be"),
    "init wrong width": (lambda h: (h["decoder"]["registers"].__setitem__(9, 3),
                                    h["decoder"]["prepare"].append(["copy", 9, ["k", 0.0]]),
                                    h["decoder"]["states"][0].update(init=9)), "init register 9 must be"),
    "init a string": (_set(("decoder", "states", 0, "init"), "r5"), "init must be an integer"),
    "state next written by prepare": (lambda h: h["decoder"]["prepare"].append(["copy", 11, ["r", 5]]),
                                      "bad prev/next"),
    # the step
    "softmaxj of a plain register": (_ins("code", 6, ["softmaxj", 24, ["r", 21]]),
                                     "softmaxj needs a register of width 1"),
    "sumj of a plain register": (lambda h: (h["decoder"]["code"].__setitem__(8, ["sumj", 44, ["r", 21]])),
                                 "sumj needs a per-position register"),
    "sumj into a positional register": (_positional([0, 2, 22, 23, 26, 28, 24, 27, 44]), "register 44 must be plain"),
    "softmax over features of positions": (_ins("code", 6, ["softmax", 24, ["r", 28]]), "softmax of a per-position"),
    "concat of positions and plain": (lambda h: (h["decoder"]["positional"].append(49),
                                                 h["decoder"]["registers"].__setitem__(49, 2 * 8)),
                                      "register 49 must be plain"),
    "logits written by prepare": (_set(("decoder", "logits"), 5), "logits register must be plain, written by code"),
    "logits width": (_set(("decoder", "logits"), 49), "logits register must be plain, written by code"),
    "logits positional": (_set(("decoder", "logits"), 23), "logits register must be plain"),
    "no decoder": (_set(("decoder",), _DELETE), "program must be an object"),
    "code empty": (_set(("decoder", "code"), []), "code must be a list of 1.."),
    # memory a file may make the runtime allocate
    "giant per-position register": (lambda h: (h["decoder"]["registers"].__setitem__(25, 1 << 19),
                                               h["decoder"]["positional"].append(25),
                                               h["limits"].update(source=65536)), "floats per stream"),
    "giant limit with wide memory": (lambda h: (h["limits"].update(source=65536),
                                                h["decoder"]["registers"].__setitem__(25, 200),
                                                h["decoder"]["positional"].append(25)), "floats per stream"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_field_is_refused_with_one_message(tmp_path, case):
    change, fragment = CASES[case]
    path, _ = s2s.build(tmp_path / "bad.nnb", change=change)
    with pytest.raises(NNBFormatError) as err:
        nn2run.load(path)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_the_valid_file_loads(tmp_path):
    path, _ = s2s.build(tmp_path / "ok.nnb")
    assert nn2run.load(path).translate(["abc"])


def test_a_language_model_program_cannot_use_the_position_ops():
    program = {"registers": [3, 3], "states": [], "logits": 1,
               "code": [["onehot", 0], ["sumj", 1, ["r", 0]]]}
    with pytest.raises(ProgramError, match="only in a seq2seq decoder"):
        validate(program, {}, 3)


def test_a_batch_too_large_for_the_limits_is_refused_before_allocating(tmp_path):
    path, _ = s2s.build(tmp_path / "big.nnb", limits=(65536, 10))
    model = nn2run.load(path)
    long = ["a" * 60000] * 200
    with pytest.raises(ValueError, match="use a smaller batch"):
        model.translate(long)


def test_random_register_damage_is_refused_or_runs(tmp_path):
    """Every operand register of every decoder instruction replaced by a random index: the
    file is refused with an NNBFormatError or it translates; nothing else happens."""
    rng = random.Random(5)
    refused = 0
    for trial in range(60):
        part = rng.choice(["prepare", "code"])

        def change(h, part=part):
            code = h["decoder"][part]
            ins = code[rng.randrange(len(code))]
            spots = [i for i, a in enumerate(ins) if isinstance(a, list) and a[0] == "r"] or [1]
            at = rng.choice(spots)
            value = rng.randrange(-2, 60)
            if at == 1:
                ins[1] = value
            else:
                ins[at] = ["r", value]
        path, _ = s2s.build(tmp_path / f"d{trial}.nnb", change=change)
        try:
            model = nn2run.load(path)
        except NNBFormatError:
            refused += 1
            continue
        out = model.translate(["abc", "hgfedcba"], beam=2)
        assert len(out) == 2 and all(isinstance(t, str) for t in out)
        assert np.isfinite(model.force(model.encode_texts(["ab"]), [[1]])[0]).all()
    assert refused > 30
