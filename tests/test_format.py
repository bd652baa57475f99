"""nn2run.format: the .nnb container (round trip, atomic write, hostile files)."""
import errno
import json
import mmap
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nn2run import format as nnb
from nn2run.format import NNBFormatError
from support import hostile

HEADER = {"program": [["matmul", 0, 1, 2], ["tanh", 2, 3]], "codec": {"kind": "char",
          "vocab": "abc é\n"}, "provenance": {"steps": 300, "loss": 1.25}}


DEEP = []
for _ in range(70):
    DEEP = [DEEP]


def make_tensors():
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
            "ids": np.array([-3, 0, 2**31 - 1], dtype=np.int32),
            "empty": np.zeros((0, 5), dtype=np.float32),
            "bytes": np.frombuffer(b"hello", dtype=np.uint8),
            "half": np.array([[0.5, -2.0]], dtype=np.float16),
            "big": np.array([2**40, -1], dtype=np.int64),
            "cube": np.ones((2, 1, 3, 2), dtype=np.float32),
            "q": np.array([[-127, 0], [5, 127], [-128, 3]], dtype=np.int8),
            "q#scale": np.array([0.25, 0.0], dtype=np.float32)}


@pytest.fixture(scope="module")
def blob():
    return nnb.dumps(HEADER, make_tensors())


def refuse(data, fragment, verify=True):
    with pytest.raises(NNBFormatError) as info:
        nnb.loads(data, verify_data=verify)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message and message
    return message


# ----------------------------------------------------------------- round trip
@pytest.mark.parametrize("via", ["read", "loads"])
def test_round_trip_keeps_header_values_shapes_and_dtypes(tmp_path, via):
    tensors = make_tensors()
    path = tmp_path / "m.nnb"
    nnb.write(path, HEADER, tensors)
    with (nnb.read(path) if via == "read" else nnb.loads(path.read_bytes())) as f:
        assert f.header == HEADER and f.version == (1, 0)
        assert list(f.tensors) == list(tensors)
        for name, array in tensors.items():
            assert f.tensors[name].dtype == array.dtype.newbyteorder("<")
            np.testing.assert_array_equal(f.tensors[name], array)
            assert f.tensors[name].shape == array.shape


def test_dumps_gives_the_bytes_write_writes(tmp_path, blob):
    nnb.write(tmp_path / "m.nnb", HEADER, make_tensors())
    assert (tmp_path / "m.nnb").read_bytes() == blob


def test_read_maps_the_file_read_only_without_copying(tmp_path):
    nnb.write(tmp_path / "m.nnb", HEADER, make_tensors())
    f = nnb.read(tmp_path / "m.nnb")
    w = f.tensors["w"]
    assert not w.flags.writeable and not w.flags.owndata
    base = w
    while isinstance(base, np.ndarray):
        base = base.base
    mapped = base.obj if isinstance(base, memoryview) else base
    assert isinstance(mapped, mmap.mmap)
    assert np.shares_memory(w, np.frombuffer(mapped, np.uint8))
    with pytest.raises(ValueError):
        w[0, 0] = 1
    f.close()
    assert f.tensors == {}
    assert float(w[1, 1]) == pytest.approx(5 / 7)  # a held view outlives close()


def test_layout_follows_the_spec(blob):
    fields, text, data = hostile.split(blob)
    assert (fields["major"], fields["minor"], fields["flags"]) == (1, 0, 0)
    header_len = hostile.header_end(blob) - nnb.PREFIX_SIZE
    assert header_len % 64 == 0 and len(blob) == 128 + header_len + len(data)
    assert hostile.seal(text.encode(), data) == blob  # a second writer agrees
    entries = json.loads(text)["tensors"]
    assert all(e["offset"] % 64 == 0 for e in entries.values())
    assert entries["w"]["offset"] == 0 and entries["ids"]["offset"] == 64


def test_logical_values_follow_the_spec(blob):
    f = nnb.loads(blob)
    values = nnb.logical(f)
    assert "q#scale" not in values and set(values) == set(make_tensors()) - {"q#scale"}
    q, s = make_tensors()["q"], make_tensors()["q#scale"]
    expected = (q.astype(np.float64) * s.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(values["q"], expected)
    np.testing.assert_array_equal(values["half"], np.array([[0.5, -2.0]]))
    assert values["q"].dtype == values["half"].dtype == np.float32
    assert values["w"] is f.tensors["w"] and values["ids"] is f.tensors["ids"]
    assert not any(v.flags.writeable for v in values.values())


def test_a_zero_size_i8_tensor_has_an_empty_scale():
    f = nnb.loads(nnb.dumps({}, {"q": np.zeros((3, 0), np.int8),
                                 "q#scale": np.zeros(0, np.float32)}))
    assert nnb.logical(f)["q"].shape == (3, 0)


def test_empty_model_round_trips():
    f = nnb.loads(nnb.dumps({}, {}))
    assert f.header == {} and f.tensors == {} and f.data_sha256_ok is True


def test_writer_converts_byte_order_and_layout():
    tensors = {"be": np.arange(6, dtype=">f4").reshape(2, 3).T, "i": np.arange(3, dtype=">i8")}
    f = nnb.loads(nnb.dumps({}, tensors))
    np.testing.assert_array_equal(f.tensors["be"], tensors["be"])
    assert f.tensors["be"].dtype == np.dtype("<f4") and f.tensors["i"].dtype == np.dtype("<i8")


@pytest.mark.parametrize("header, tensors, error", [
    ({}, {"x": np.zeros(2, np.float64)}, TypeError),
    ({}, {"x": np.zeros(2, bool)}, TypeError),
    ({}, {3: np.zeros(2, np.float32)}, TypeError),
    ({"loss": float("nan")}, {}, ValueError),
    ({"f": object()}, {}, TypeError),
    ({"tensors": 1}, {}, ValueError),
    ({"deep": DEEP}, {}, ValueError),
    ({}, {"": np.zeros(1, np.float32)}, ValueError),
    ({}, {"x": np.zeros((1,) * 5, np.float32)}, ValueError),
    ({}, {"q": np.zeros((2, 3), np.int8)}, ValueError),
    ({}, {"q": np.zeros(3, np.int8), "q#scale": np.ones(2, np.float32)}, ValueError),
    ({}, {"q": np.zeros(3, np.int8), "q#scale": np.ones(3, np.float16)}, ValueError),
    ({}, {"x#scale": np.ones(3, np.float32)}, ValueError),
    ({}, {"x": np.ones(3, np.float32), "x#scale": np.ones(3, np.float32)}, ValueError),
])
def test_writer_refuses_what_the_reader_would_refuse(tmp_path, header, tensors, error):
    with pytest.raises(error):
        nnb.write(tmp_path / "m.nnb", header, tensors)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- atomic write
def fail_after(monkeypatch, name, calls=0):
    real = getattr(os, name)
    count = [0]

    def fake(*args):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)
    monkeypatch.setattr(os, name, fake)


@pytest.mark.parametrize("name, calls", [("write", 0), ("write", 1), ("fsync", 0),
                                         ("replace", 0)])
def test_failed_write_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch, name, calls):
    path = tmp_path / "m.nnb"
    path.write_bytes(b"the old model")
    fail_after(monkeypatch, name, calls)
    with pytest.raises(OSError) as info:
        nnb.write(path, HEADER, make_tensors())
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"the old model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.nnb"]


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    fail_after(monkeypatch, "write", 1)
    with pytest.raises(OSError):
        nnb.write(tmp_path / "m.nnb", HEADER, make_tensors())
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.nnb"
    path.write_bytes(b"old")
    nnb.write(path, HEADER, make_tensors())
    assert nnb.read(path).header == HEADER
    assert [p.name for p in tmp_path.iterdir()] == ["m.nnb"]


# ----------------------------------------------------------------- files that are not .nnb
def read_refused(path, fragment):
    with pytest.raises(NNBFormatError) as info:
        nnb.read(path)
    assert fragment in str(info.value) and str(path) not in str(info.value)


def test_missing_file(tmp_path):
    read_refused(tmp_path / "nope.nnb", "no such file")


def test_directory(tmp_path):
    read_refused(tmp_path, "is a directory")


def test_empty_file(tmp_path):
    (tmp_path / "e.nnb").write_bytes(b"")
    read_refused(tmp_path / "e.nnb", "empty file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    read_refused(tmp_path / "pipe", "not a regular file")


# ----------------------------------------------------------------- hostile files
@pytest.mark.parametrize("case", list(hostile.CASES))
@pytest.mark.parametrize("via", ["loads", "read"])
def test_hostile_file_is_refused_with_its_reason(tmp_path, blob, case, via):
    built = hostile.CASES[case](blob)
    assert built is not None, "the synthetic model must exercise every case"
    bad, fragment = built
    if via == "loads":
        refuse(bad, fragment)
    else:
        (tmp_path / "bad.nnb").write_bytes(bad)
        with pytest.raises(NNBFormatError) as info:
            nnb.read(tmp_path / "bad.nnb", verify_data=True)
        assert fragment in str(info.value)


def test_future_version_message_names_both_versions(blob):
    message = refuse(hostile.future_major(blob)[0], "newer")
    assert message == "made by a newer nn2c (format 2.3; this nn2run reads 1.x)"


def test_huge_claimed_tensor_is_refused_by_size_not_allocation(blob):
    message = refuse(hostile.huge_dim(blob)[0], "past the end")
    assert "4000000000000" in message


def test_truncation_at_every_offset_is_refused(blob):
    refuse(blob[:0], "empty file")
    for size in range(1, len(blob)):
        refuse(blob[:size], "truncated")


def test_every_bit_of_prefix_and_header_is_protected(blob):
    for bit in range(hostile.header_end(blob) * 8):
        if 96 * 8 <= bit < 128 * 8:  # the data digest: checked only with verify_data
            assert nnb.loads(hostile.flip_bit(blob, bit), verify_data=False)
            refuse(hostile.flip_bit(blob, bit), "data checksum")
        else:
            with pytest.raises(NNBFormatError):
                nnb.loads(hostile.flip_bit(blob, bit), verify_data=False)


def test_data_bit_flips_are_caught_by_verify_data(blob):
    start = hostile.header_end(blob)
    for at in range(start, len(blob)):
        bad = hostile.flip_bit(blob, at * 8 + (at % 8))
        with pytest.raises(NNBFormatError, match="data checksum|padding"):
            nnb.loads(bad, verify_data=True)
        try:
            f = nnb.loads(bad, verify_data=False)
        except NNBFormatError as exc:  # unchecked data may still break a rule on values
            assert "padding" in str(exc) or "scale is" in str(exc)
        else:
            assert f.data_sha256_ok is None
            assert nnb.verify_data(f) is False and f.data_sha256_ok is False


def test_read_verifies_data_on_request(tmp_path, blob):
    bad, _ = hostile.data_bit_flip(blob)
    (tmp_path / "bad.nnb").write_bytes(bad)
    assert nnb.read(tmp_path / "bad.nnb").data_sha256_ok is None
    with pytest.raises(NNBFormatError, match="data checksum"):
        nnb.read(tmp_path / "bad.nnb", verify_data=True)
    (tmp_path / "good.nnb").write_bytes(blob)
    assert nnb.read(tmp_path / "good.nnb", verify_data=True).data_sha256_ok is True


# ----------------------------------------------------------------- properties
def mutate(blob, data):
    """Apply a few random mutations; some re-seal the header so they reach the parser."""
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "overwrite", "delete",
                                          "header"]))
        at = data.draw(st.integers(0, len(out)))
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=64))
        elif kind == "overwrite":
            chunk = data.draw(st.binary(min_size=1, max_size=64))
            out[at:at + len(chunk)] = chunk
        elif kind == "delete":
            del out[at:at + data.draw(st.integers(1, 64))]
        elif kind == "header" and len(out) >= 128:
            end = min(hostile.header_end(bytes(out)), len(out))
            header = bytearray(out[128:end])
            pos = data.draw(st.integers(0, len(header)))
            header[pos:pos + data.draw(st.integers(0, 8))] = data.draw(st.binary(max_size=8))
            out = bytearray(hostile.seal(bytes(header), bytes(out[end:])))
    return bytes(out)


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_file_loads_or_is_refused_cleanly(blob, data):
    bad = mutate(blob, data)
    for verify in (False, True):
        try:
            f = nnb.loads(bad, verify_data=verify)
        except NNBFormatError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert sum(t.nbytes for t in f.tensors.values()) <= len(bad)
            assert not any(t.flags.writeable for t in f.tensors.values())


# ----------------------------------------------------------------- runtime promises
def test_opening_a_50_mb_model_costs_the_same_as_a_small_one(tmp_path):
    tensors = {f"w{i}": np.ones((1024, 1280), np.float32) for i in range(10)}
    nnb.write(tmp_path / "big.nnb", HEADER, tensors)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        nnb.read(tmp_path / "big.nnb").close()
        times.append(time.perf_counter() - start)
    assert sorted(times)[2] < 0.05  # ~1 ms in practice; generous for loaded machines
    assert nnb.verify_data(nnb.read(tmp_path / "big.nnb"))


def test_format_imports_only_numpy_and_the_standard_library():
    # the package's __init__ is bypassed: the container (format and its header checks)
    # must stand on its own, without the rest of nn2run
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nn2run")
    code = ("import sys, types; p = types.ModuleType('nn2run'); p.__path__ = [sys.argv[1]];"
            " sys.modules['nn2run'] = p; import nn2run.format; print(sorted(m for m in sys.modules"
            " if m.split('.')[0] in ('torch', 'lark', 'rich', 'click', 'nn2c', 'nn2run')))")
    out = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "['nn2run', 'nn2run.format', 'nn2run.header']"


def test_fuzz_script_runs_clean_on_a_short_run(capsys):
    from support import fuzz_loader
    assert fuzz_loader.main(["--inputs", "3000", "--seed", "7", "--loader", "format",
                             "--mem-mb", "0"]) == 0
    assert ", 0 crashes in " in capsys.readouterr().out
