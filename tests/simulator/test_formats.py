"""Bodies and SSE frames of every inference route, byte for byte where LM Studio's are known."""

from __future__ import annotations

import anyio
import pytest

from gateway.simulator import FakeClock, SimModel, SimSettings, Simulator
from gateway.simulator.testing import parse_sse

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Say something"}]


@pytest.fixture
async def sim(instant_models, clock):
    async with Simulator(models=instant_models, settings=SimSettings(completion_tokens=3), clock=clock) as sim:
        yield sim


async def stream(client, url: str, body: dict) -> tuple[bytes, list]:
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        raw = await response.aread()
    return raw, parse_sse(raw)


async def test_a_chat_stream_is_framed_exactly_as_lm_studio_frames_it(sim, client):
    raw, events = await stream(client, sim.url + "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES})
    first = events[0].json()
    head = (
        '{"id":"' + first["id"] + '","object":"chat.completion.chunk","created":1700000000,"model":"alpha","system_fingerprint":"alpha",'
    )
    words = [e.json()["choices"][0]["delta"]["content"] for e in events[:3]]
    assert raw == (
        b"data: " + (head + '"choices":[{"index":0,"delta":{"role":"assistant","content":"' + words[0] + '"},"logprobs":null,"finish_reason":null}]}').encode() + b"\n\n"
        b"data: " + (head + '"choices":[{"index":0,"delta":{"content":"' + words[1] + '"},"logprobs":null,"finish_reason":null}]}').encode() + b"\n\n"
        b"data: " + (head + '"choices":[{"index":0,"delta":{"content":"' + words[2] + '"},"logprobs":null,"finish_reason":null}]}').encode() + b"\n\n"
        b"data: " + (head + '"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}').encode() + b"\n\n"
        b"data: [DONE]\n\n"
    )
    assert first["id"].startswith("chatcmpl-") and len(first["id"]) == len("chatcmpl-") + 21


async def test_the_usage_frame_comes_only_with_include_usage(sim, client):
    body = {"model": "alpha", "messages": MESSAGES, "stream_options": {"include_usage": True}}
    _, events = await stream(client, sim.url + "/v1/chat/completions", body)
    usage = events[-2].json()
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert events[-1].data == "[DONE]"
    _, plain = await stream(client, sim.url + "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES})
    assert all("usage" not in e.json() for e in plain[:-1])


async def test_stream_usage_off_ignores_include_usage_like_llama_cpp_python(sim, client):
    # llama-cpp-python's server (and LM Studio before 0.3.18) never send the usage frame; the
    # non-streaming answer keeps its usage.
    sim.settings.stream_usage = False
    body = {"model": "alpha", "messages": MESSAGES, "stream_options": {"include_usage": True}}
    raw, events = await stream(client, sim.url + "/v1/chat/completions", body)
    assert b'"usage"' not in raw
    assert events[-2].json()["choices"][0]["finish_reason"] == "stop" and events[-1].data == "[DONE]"
    _, text_events = await stream(client, sim.url + "/v1/completions", {"model": "alpha", "prompt": "Once", **body})
    assert all("usage" not in e.json() for e in text_events[:-1])
    whole = (await client.post(sim.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})).json()
    assert whole["usage"]["completion_tokens"] == 3


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(sim, client):
    _, events = await stream(client, sim.url + "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "max_tokens": 2})
    assert len(events) == 4  # two tokens, the final frame, [DONE]
    assert events[2].json()["choices"][0]["finish_reason"] == "length"


async def test_a_non_streaming_chat_body_has_usage_stats_and_fingerprint(sim, client):
    response = await client.post(sim.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})
    body = response.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "stats", "system_fingerprint"]
    assert body["object"] == "chat.completion" and body["created"] == 1700000000
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["reasoning_content"] == ""
    assert body["choices"][0]["message"]["tool_calls"] == []
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7, "completion_tokens_details": {"reasoning_tokens": 0}}
    assert body["stats"] == {} and body["system_fingerprint"] == "alpha"


async def test_content_is_deterministic_and_the_same_streamed_or_not(sim, client):
    body = {"model": "alpha", "messages": MESSAGES, "seed": 7}
    whole = (await client.post(sim.url + "/v1/chat/completions", json=body)).json()
    again = await client.post(sim.url + "/v1/chat/completions", json=body)
    _, events = await stream(client, sim.url + "/v1/chat/completions", body)
    streamed = "".join(e.json()["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert again.json() == whole
    assert streamed == whole["choices"][0]["message"]["content"]
    assert events[0].json()["id"] == whole["id"]
    other = (await client.post(sim.url + "/v1/chat/completions", json={**body, "seed": 8})).json()
    assert other["choices"][0]["message"]["content"] != whole["choices"][0]["message"]["content"]


async def test_the_seed_setting_changes_the_content(instant_models, client):
    bodies = []
    for seed in (0, 0, 1):
        async with Simulator(models=instant_models, settings=SimSettings(seed=seed), clock=FakeClock()) as sim:
            bodies.append((await client.post(sim.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})).content)
    assert bodies[0] == bodies[1] != bodies[2]


async def test_reasoning_models_stream_reasoning_content_first(clock, client, instant):
    model = SimModel(id="thinker", loaded=True, reasoning_tokens=2, **instant)
    async with Simulator(models=[model], settings=SimSettings(completion_tokens=2), clock=clock) as sim:
        _, events = await stream(client, sim.url + "/v1/chat/completions", {"model": "thinker", "messages": MESSAGES})
        whole = (await client.post(sim.url + "/v1/chat/completions", json={"model": "thinker", "messages": MESSAGES})).json()
    deltas = [e.json()["choices"][0]["delta"] for e in events[:4]]
    assert list(deltas[0]) == ["role", "reasoning_content"]
    assert list(deltas[1]) == ["reasoning_content"]
    assert list(deltas[2]) == ["content"] and list(deltas[3]) == ["content"]
    assert whole["choices"][0]["message"]["reasoning_content"] == deltas[0]["reasoning_content"] + deltas[1]["reasoning_content"]
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}


async def test_api_v0_chat_adds_stats_model_info_and_runtime(sim, client):
    body = (await client.post(sim.url + "/api/v0/chat/completions", json={"model": "alpha", "messages": MESSAGES})).json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "stats", "model_info", "runtime"}
    assert body["stats"]["stop_reason"] == "eosFound"
    assert set(body["stats"]) == {"tokens_per_second", "time_to_first_token", "generation_time", "stop_reason"}
    assert body["model_info"] == {"arch": "llama", "quant": "Q4_K_M", "format": "gguf", "context_length": 4096}
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


async def test_api_v0_text_completions_add_stats_model_info_and_runtime(sim, client):
    body = (await client.post(sim.url + "/api/v0/completions", json={"model": "alpha", "prompt": "Once", "max_tokens": 2})).json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "stats", "model_info", "runtime"}
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["stats"]["stop_reason"] == "maxPredictedTokensReached"
    assert body["model_info"] == {"arch": "llama", "quant": "Q4_K_M", "format": "gguf", "context_length": 4096}
    assert body["runtime"]["supported_formats"] == ["gguf"]
    v1 = (await client.post(sim.url + "/v1/completions", json={"model": "alpha", "prompt": "Once", "max_tokens": 2})).json()
    assert v1["stats"] == {} and "model_info" not in v1


async def test_v0_stats_report_the_simulated_timing(client):
    model = SimModel(id="timed", loaded=True, tokens_per_second=20.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with (
        Simulator(models=[model], settings=SimSettings(completion_tokens=4), clock=FakeClock()) as sim,
        anyio.create_task_group() as tg,
    ):
        result = {}

        async def call() -> None:
            result["body"] = (await client.post(sim.url + "/api/v0/chat/completions", json={"model": "timed", "messages": MESSAGES})).json()

        tg.start_soon(call)
        await sim.wait_for(lambda c: c.generations_started == 1)
        sim.clock.advance(1.0)
    assert result["body"]["stats"]["generation_time"] == 0.2
    assert result["body"]["stats"]["tokens_per_second"] == 20


async def test_text_completions_stream_and_body(sim, client):
    _, events = await stream(client, sim.url + "/v1/completions", {"model": "alpha", "prompt": "Once"})
    first = events[0].json()
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    assert first["choices"] == [{"index": 0, "text": first["choices"][0]["text"], "logprobs": None, "finish_reason": None}]
    assert events[-2].json()["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert events[-1].data == "[DONE]"
    body = (await client.post(sim.url + "/v1/completions", json={"model": "alpha", "prompt": "Once"})).json()
    assert body["choices"][0]["text"] == "".join(e.json()["choices"][0]["text"] for e in events[:-1])
    assert body["usage"]["prompt_tokens"] == 1


async def test_responses_stream_events_in_order(sim, client):
    _, events = await stream(client, sim.url + "/v1/responses", {"model": "alpha", "input": "Hi there"})
    kinds = [e.event for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.json()["sequence_number"] for e in events] == list(range(len(events)))
    assert all(e.json()["type"] == e.event for e in events)
    completed = events[-1].json()["response"]
    assert completed["status"] == "completed"
    assert completed["output"][0]["content"][0]["text"] == events[7].json()["text"]
    assert completed["usage"]["input_tokens"] == 2


async def test_responses_body(sim, client):
    body = (await client.post(sim.url + "/v1/responses", json={"model": "alpha", "input": [{"role": "user", "content": "Hi"}], "max_output_tokens": 2})).json()
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 2


async def test_messages_stream_and_body_follow_anthropic(sim, client):
    request = {"model": "alpha", "max_tokens": 100, "system": "Be brief", "messages": MESSAGES}
    _, events = await stream(client, sim.url + "/v1/messages", request)
    assert [e.event for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[6].json() == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 3}}
    body = (await client.post(sim.url + "/v1/messages", json=request)).json()
    assert body["type"] == "message" and body["id"].startswith("msg_")
    assert body["content"][0]["text"] == "".join(e.json()["delta"]["text"] for e in events[2:5])
    assert body["usage"] == {"input_tokens": 6, "output_tokens": 3}
    missing = await client.post(sim.url + "/v1/messages", json={"model": "nope", "max_tokens": 5, "messages": MESSAGES})
    assert missing.status_code == 400
    assert missing.json()["type"] == "error" and missing.json()["error"]["type"] == "invalid_request_error"


async def test_embeddings_are_unit_vectors_that_depend_only_on_the_text(sim, client):
    first = (await client.post(sim.url + "/v1/embeddings", json={"model": "embed", "input": ["a", "b"]})).json()
    second = (await client.post(sim.url + "/api/v0/embeddings", json={"model": "embed", "input": "a"})).json()
    assert first["object"] == "list" and first["model"] == "embed"
    assert first["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert [d["index"] for d in first["data"]] == [0, 1]
    vector = first["data"][0]["embedding"]
    assert len(vector) == 768 and abs(sum(v * v for v in vector) - 1) < 1e-5
    assert second["data"][0]["embedding"] == vector


async def test_embedding_with_an_llm_and_chat_with_an_embedding_model_are_400(sim, client):
    wrong = await client.post(sim.url + "/v1/embeddings", json={"model": "alpha", "input": "a"})
    chat = await client.post(sim.url + "/v1/chat/completions", json={"model": "embed", "messages": MESSAGES})
    assert wrong.status_code == chat.status_code == 400


async def test_a_bad_request_body_is_a_400(sim, client):
    response = await client.post(sim.url + "/v1/chat/completions", json={"model": "alpha"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
