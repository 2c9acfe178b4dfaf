"""The official openai SDK against the simulator: it must parse every stream and error unaided."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from gateway.simulator import SimSettings, Simulator

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Say something"}]


@pytest.fixture
async def sim(instant_models, clock) -> AsyncIterator[Simulator]:
    async with Simulator(models=instant_models, settings=SimSettings(completion_tokens=5), clock=clock) as sim:
        yield sim


@pytest.fixture
async def sdk(sim) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="lm-studio", max_retries=0, timeout=5.0)
    async with client:
        yield client


async def test_models_list(sdk):
    models = await sdk.models.list()
    assert [m.id for m in models.data] == ["alpha", "beta", "embed"]


async def test_chat_completion(sdk):
    completion = await sdk.chat.completions.create(model="alpha", messages=MESSAGES)
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.system_fingerprint == "alpha"


async def test_chat_stream_with_usage(sdk):
    stream = await sdk.chat.completions.create(
        model="alpha", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = await sdk.chat.completions.create(model="alpha", messages=MESSAGES)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 9


async def test_chat_stream_on_a_jit_loaded_model(sdk, sim):
    stream = await sdk.chat.completions.create(model="beta", messages=MESSAGES, stream=True)
    assert len([chunk async for chunk in stream]) == 6
    assert sim.counters.loads_completed == 1


async def test_text_completion_stream(sdk):
    stream = await sdk.completions.create(model="alpha", prompt="Once", stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks)


async def test_embeddings(sdk):
    result = await sdk.embeddings.create(model="embed", input=["a", "b"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 768


async def test_responses_create_and_stream(sdk):
    response = await sdk.responses.create(model="alpha", input="Hi")
    assert response.status == "completed" and response.output_text
    stream = await sdk.responses.create(model="alpha", input="Hi", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text


async def test_unknown_model_is_a_bad_request_error_with_lm_studio_code(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="o4-mini", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert 'Invalid model identifier "o4-mini"' in caught.value.message


async def test_jit_off_with_nothing_loaded_is_a_bad_request_error(sdk, sim):
    sim.settings.jit = False
    await sim.unload_model("alpha")
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="alpha", messages=MESSAGES)
    assert "No models loaded" in caught.value.message


async def test_context_overflow_non_streaming_is_a_bad_request_error(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x" * 4 * 5000}])
    # A string-shaped error: the SDK keeps it as the body (its message is just "Error code: 400").
    assert caught.value.body.startswith("<LM Studio error> Trying to keep the first 5000 tokens when context the overflows")


async def test_context_overflow_streaming_raises_from_the_error_event(sdk):
    stream = await sdk.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "x" * 4 * 5000}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert caught.value.message.startswith("Input does not fit in context length. The input has 5000 tokens")


async def test_error_mid_stream_raises_api_error(sdk, sim):
    sim.inject_fault("error_mid_stream", after_tokens=2)
    stream = await sdk.chat.completions.create(model="alpha", messages=MESSAGES, stream=True)
    seen = 0
    with pytest.raises(openai.APIError):
        async for _ in stream:
            seen += 1
    assert seen == 2


async def test_crash_mid_stream_is_a_connection_error(sdk, sim):
    sim.inject_fault("crash_mid_stream", after_tokens=1)
    stream = await sdk.chat.completions.create(model="alpha", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            pass


async def test_http_error_fault_with_retry_after_is_parsed(sdk, sim):
    sim.inject_fault("http_error", status=503, message="Server busy", retry_after=3)
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(model="alpha", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "3"


async def test_auth_errors_are_authentication_errors(instant_models, clock):
    settings = SimSettings(api_token="sk-lm-abc:def")
    async with Simulator(models=instant_models, settings=settings, clock=clock) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="lm-studio", max_retries=0) as sdk:
            with pytest.raises(openai.AuthenticationError) as caught:
                await sdk.models.list()
        assert caught.value.code == "invalid_api_key"
        async with openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="sk-lm-abc:def", max_retries=0) as sdk:
            assert (await sdk.models.list()).data


async def test_model_unloaded_mid_stream_raises_api_error(sdk, sim):
    sim.inject_fault("model_unloaded_mid_stream", after_tokens=1)
    stream = await sdk.chat.completions.create(model="alpha", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert caught.value.body == "Model unloaded."
    assert sim.counters.generations_killed == 1 and sim.counters.instances == {}
