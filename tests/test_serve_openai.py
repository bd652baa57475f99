"""`nn2run serve` through the official `openai` Python client pointed at it with base_url."""

from __future__ import annotations

import pytest

from test_serve import Served, cli_text

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    s = Served(model, "--api-key", "k-123", tmp_path=tmp_path_factory.mktemp("openai"))
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from support.models import build_model
    path, _, _ = build_model(tmp_path_factory.mktemp("oa") / "m.nnb", "lstm", 16, 2, 5)
    return path


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="k-123", max_retries=0, timeout=30)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["m"]


def test_models_retrieve(client):
    got = client.models.retrieve("m")
    assert (got.id, got.object, got.owned_by) == ("m", "model", "nn2")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


def test_completion_matches_the_cli_for_the_same_seed(client, model):
    out = client.completions.create(model="m", prompt="abc", max_tokens=30, seed=4)
    assert out.choices[0].text == cli_text(model, "abc", 30, 4)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 30, 33)


def test_streaming_gives_the_same_text(client):
    whole = client.completions.create(model="m", prompt="ba", max_tokens=40, seed=9,
                                      extra_body={"top_k": 3}).choices[0].text
    chunks = list(client.completions.create(model="m", prompt="ba", max_tokens=40, seed=9, stream=True,
                                            extra_body={"top_k": 3}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_and_n(client):
    out = client.completions.create(model="m", prompt=["a", "b"], n=2, max_tokens=20, seed=1, stop=["e"])
    assert len(out.choices) == 4
    assert all("e" not in c.text for c in out.choices)


def test_bad_input_is_a_bad_request_error_naming_the_character(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="aXb", max_tokens=3)
    assert e.value.status_code == 400 and "'X'" in e.value.message and e.value.param == "prompt"


def test_a_wrong_key_is_an_authentication_error(served):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="m", prompt="a", max_tokens=3)


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=3)
