"""The official OpenAI Python SDK against the proxy: completions and chat,
streaming and not, token-exact against the single reference instance S."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import prompt_of

openai = pytest.importorskip("openai", reason="pip install 'vllm-ascend-pd[test]' (declares openai)")

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
EXTRA = {"ignore_eos": True, "return_token_ids": True}


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(url: str, prompt):
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, extra_body=EXTRA)
    return r


def complete_stream(url: str, prompt):
    stream = client(url).completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=EXTRA)
    text, usage, finish = "", None, None
    for chunk in stream:
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage, finish


def chat_messages():
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "alpha beta gamma delta prefill decode " * 9}]


def chat(url: str):
    return client(url).chat.completions.create(model="tiny", messages=chat_messages(),
                                               max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)


def chat_stream(url: str):
    stream = client(url).chat.completions.create(
        model="tiny", messages=chat_messages(), max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=EXTRA)
    text, usage, finish, roles = "", None, None, set()
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.delta.role:
                roles.add(c.delta.role)
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage, finish, roles


def test_completion(cluster, tokenizer):
    prompt = prompt_of(tokenizer, 70, seed=11)
    expected = complete(cluster.S.url, prompt)
    got = complete(cluster.proxy_url, prompt)
    assert got.choices[0].text == expected.choices[0].text
    assert got.choices[0].model_extra["token_ids"] == expected.choices[0].model_extra["token_ids"]
    assert len(got.choices[0].model_extra["token_ids"]) == MAX_TOKENS
    assert got.choices[0].finish_reason == "length"
    assert got.model == "tiny"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        len(prompt), MAX_TOKENS, len(prompt) + MAX_TOKENS)


def test_completion_text_prompt_streaming(cluster):
    prompt = "the decode instance pulls the cache from the prefill instance " * 5
    expected = complete(cluster.S.url, prompt)
    text, usage, finish = complete_stream(cluster.proxy_url, prompt)
    assert text == expected.choices[0].text and text
    assert finish == "length"
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.usage.prompt_tokens, MAX_TOKENS)


def test_chat(cluster):
    expected = chat(cluster.S.url)
    got = chat(cluster.proxy_url)
    assert got.choices[0].message.content == expected.choices[0].message.content
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].model_extra.get("token_ids") == expected.choices[0].model_extra.get("token_ids")
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        expected.usage.prompt_tokens, MAX_TOKENS)


def test_chat_streaming(cluster):
    expected = chat(cluster.S.url)
    text, usage, finish, roles = chat_stream(cluster.proxy_url)
    assert text == expected.choices[0].message.content and text
    assert roles == {"assistant"} and finish == "length"
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.usage.prompt_tokens, MAX_TOKENS)


def test_unknown_model_is_a_404_not_found_error(cluster):
    with pytest.raises(openai.NotFoundError) as e:
        client(cluster.proxy_url).completions.create(model="other", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404
