"""The official `openai` Python client against the `openai-api` function.

    python tests/openai/test_client.py BASE_URL [--forbidden-url URL]

BASE_URL is the function's `/v1`, e.g. http://127.0.0.1:8080/fn/openai-api/v1.
`--forbidden-url` names a deployment of the same package whose manifest does
not allow the model (the permission error). Runs every check, prints each
result, exits 1 if any failed. `tests/tests/openai.rs` drives it against a
real server.
"""

import argparse
import json
import re
import sys
import time
import traceback

import jsonschema
import openai
import pydantic

MODEL = "smollm2-135m-instruct"
QUESTION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
PROMPT = "The capital of France is"


def check_models(client, _args):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids, ids
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object) == (MODEL, "model"), model
    try:
        client.models.retrieve("no-such-model")
        raise AssertionError("retrieving an unknown model succeeded")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e.body


def check_usage(usage):
    assert usage.prompt_tokens > 0, usage
    assert usage.completion_tokens > 0, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def greedy_chat(client, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, **kw
    )


def check_chat(client, _args):
    r = greedy_chat(client)
    assert r.id.startswith("chatcmpl-"), r.id
    assert (r.object, r.model) == ("chat.completion", MODEL), r
    assert r.created > 1_600_000_000, r.created
    assert len(r.choices) == 1, r.choices
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant", c
    assert "Paris" in c.message.content, c.message.content
    check_usage(r.usage)
    assert r.usage.prompt_tokens > 10, "chat template not applied: %s" % r.usage
    assert r.usage.completion_tokens <= 24, r.usage
    assert c.finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop"), (
        c.finish_reason,
        r.usage,
    )
    # Content as an array of text parts is the same conversation.
    parts = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
        for m in QUESTION
    ]
    again = client.chat.completions.create(
        model=MODEL, messages=parts, max_tokens=24, temperature=0
    )
    assert again.choices[0].message.content == c.message.content, again


def check_chat_stream(client, _args):
    whole = greedy_chat(client)
    chunks = list(greedy_chat(client, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks), chunks
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-"), chunks
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices[0].choices[0].delta.role == "assistant", with_choices[0]
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    assert len(with_choices) > 3, "the reply came in one piece: %s" % with_choices
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    finishes = [ch.choices[0].finish_reason for ch in with_choices]
    assert finishes[-1] == whole.choices[0].finish_reason, finishes
    assert all(f is None for f in finishes[:-1]), finishes
    # The usage chunk comes last, with no choices; the others carry none.
    assert chunks[-1].choices == [], chunks[-1]
    assert chunks[-1].usage == whole.usage, (chunks[-1].usage, whole.usage)
    assert all(ch.usage is None for ch in chunks[:-1]), chunks
    # Without stream_options there is no usage chunk.
    plain = list(greedy_chat(client, stream=True))
    assert all(ch.choices for ch in plain), plain
    assert "".join(ch.choices[0].delta.content or "" for ch in plain) == text


def check_completions(client, _args):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion", r
    text = r.choices[0].text
    assert "Paris" in text, text
    check_usage(r.usage)
    assert r.usage.completion_tokens <= 8, r.usage
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=[PROMPT],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(ch.object == "text_completion" for ch in chunks), chunks
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == text, (streamed, text)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage, (chunks[-1], r.usage)
    # OpenAI's default for completions is 16 tokens.
    default = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens <= 16, default.usage


def check_max_tokens(client, _args):
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    for n in (1, 5):
        r = client.chat.completions.create(
            model=MODEL, messages=story, max_completion_tokens=n, temperature=0
        )
        assert r.choices[0].finish_reason == "length", r
        assert r.usage.completion_tokens == n, r.usage
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 5, chunks[-1]
    assert chunks[-2].choices[0].finish_reason == "length", chunks[-2]


def check_stop(client, _args):
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    text = free.choices[0].text
    # A word from the middle of the free reply: the reply must end right
    # before its first occurrence.
    words = [w for w in text.split() if text.find(w) > 0]
    assert len(words) > 2, "too little to stop in: %r" % text
    stop = words[len(words) // 2]
    expected = text[: text.find(stop)]
    for stream in (False, True):
        r = client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=16,
            temperature=0,
            stop=[stop, "never-generated-xyz"],
            stream=stream,
        )
        if stream:
            chunks = [ch for ch in r if ch.choices]
            got = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (got, finish) == (expected, "stop"), (stream, stop, got, finish, text)
    chat = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop="Paris"
    )
    assert "Paris" not in chat.choices[0].message.content, chat
    assert chat.choices[0].finish_reason == "stop", chat


def check_seeded_sampling(client, _args):
    def sample(seed):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a short poem."}],
            max_tokens=16,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            extra_body={"top_k": 50, "repetition_penalty": 1.1},
        )
        return r.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first, "the same seed gave another reply"
    assert len({first, sample(1), sample(2), sample(3)}) > 1, "seeds make no difference"


def check_logprobs(client, _args):
    r = greedy_chat(client, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    text = b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace")
    assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
    for t in content:
        top = t.top_logprobs
        assert len(top) == 5, t
        # Greedy: the chosen token is the most likely one.
        assert (top[0].bytes, top[0].logprob) == (t.bytes, t.logprob), t
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:])), top
        assert t.logprob <= 0 and sum(2.718281828 ** a.logprob for a in top) <= 1.0001, t
    # Streamed: the same tokens, chunk by chunk.
    streamed = []
    for chunk in greedy_chat(client, logprobs=True, top_logprobs=5, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(t.bytes, round(t.logprob, 4)) for t in streamed] == [
        (t.bytes, round(t.logprob, 4)) for t in content
    ], "streamed logprobs differ from whole ones"
    # Without top_logprobs: the chosen token only.
    plain = greedy_chat(client, logprobs=True).choices[0].logprobs.content
    assert plain and all(t.top_logprobs == [] for t in plain), plain
    # Completions' own format.
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    n = c.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n, lp
    assert lp.text_offset[0] == 0 and all(len(t) <= 3 for t in lp.top_logprobs), lp
    assert greedy_chat(client).choices[0].logprobs is None


def check_penalties_and_bias(client, _args):
    def greedy(**kw):
        return greedy_chat(client, logprobs=True, **kw).choices[0].logprobs.content

    # +100 forces one token every time; -100 keeps it out.
    forced = greedy(logit_bias={"42": 100})
    assert len({bytes(t.bytes) for t in forced}) == 1, forced
    banned = greedy(logit_bias={"42": -100})
    assert all(bytes(t.bytes) != bytes(forced[0].bytes) for t in banned), banned
    # Penalties change a greedy answer that repeats itself.
    repeat = [{"role": "user", "content": "Repeat the word 'cat' twenty times."}]

    def words(**kw):
        r = client.chat.completions.create(model=MODEL, messages=repeat, max_tokens=30, temperature=0, **kw)
        return r.choices[0].message.content

    plain = words()
    assert words(frequency_penalty=2.0) != plain
    assert words(presence_penalty=2.0) != plain
    # vLLM's min_tokens and ignore_eos: the answer runs to its length.
    short = [{"role": "user", "content": "Say OK."}]
    r = client.chat.completions.create(model=MODEL, messages=short, max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length", r
    r = client.chat.completions.create(model=MODEL, messages=short, max_tokens=60, temperature=0,
                                       extra_body={"min_tokens": 30})
    assert r.usage.completion_tokens >= 30, r.usage


def expect(cls, code, param, f):
    try:
        f()
    except cls as e:
        assert (e.code, e.param) == (code, param), (e.code, e.param, e.body)
        assert isinstance(e.body, dict) and e.body.get("message") and e.body.get("type"), e.body
        return
    raise AssertionError("no %s" % cls.__name__)


def check_errors(client, _args):
    chat = client.chat.completions.create
    msgs = QUESTION
    expect(openai.NotFoundError, "model_not_found", "model",
           lambda: chat(model="no-such-model", messages=msgs, max_tokens=4))
    expect(openai.NotFoundError, "model_not_found", "model",
           lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=4))
    expect(openai.BadRequestError, "unsupported_parameter", "best_of",
           lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=4, best_of=2))
    expect(openai.BadRequestError, "invalid_value", "n",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, n=17))
    expect(openai.BadRequestError, "invalid_value", "n",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, n=0))
    expect(openai.BadRequestError, "invalid_value", "top_logprobs",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, logprobs=True, top_logprobs=21))
    expect(openai.BadRequestError, "invalid_value", "top_logprobs",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, top_logprobs=2))
    expect(openai.BadRequestError, "invalid_value", "logprobs",
           lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=4, logprobs=6))
    expect(openai.BadRequestError, "invalid_value", "presence_penalty",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, presence_penalty=2.5))
    expect(openai.BadRequestError, "invalid_value", "frequency_penalty",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, frequency_penalty=-3))
    expect(openai.BadRequestError, "invalid_value", "logit_bias",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, logit_bias={"x": 1}))
    expect(openai.BadRequestError, "invalid_value", "logit_bias",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, logit_bias={"5": 101}))
    # A token the model does not have: the host refuses it.
    expect(openai.BadRequestError, "invalid_value", None,
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, logit_bias={"999999": 1}))
    expect(openai.BadRequestError, "invalid_value", "min_tokens",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, extra_body={"min_tokens": 5}))
    expect(openai.BadRequestError, "invalid_value", "temperature",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, temperature=5))
    expect(openai.BadRequestError, "invalid_value", "max_tokens",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=0))
    expect(openai.BadRequestError, "invalid_value", "stop",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, stop=["a", "b", "c", "d", "e"]))
    expect(openai.BadRequestError, "invalid_value", "messages",
           lambda: chat(model=MODEL, messages=[], max_tokens=4))
    expect(openai.BadRequestError, "unsupported_parameter", "messages[0].role",
           lambda: chat(model=MODEL, messages=[{"role": "function", "content": "x", "name": "f"}]))
    expect(openai.BadRequestError, "unknown_parameter", "bogus",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, extra_body={"bogus": 1}))
    expect(openai.BadRequestError, "invalid_value", "stream_options",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4,
                        stream_options={"include_usage": True}))
    expect(openai.BadRequestError, "context_length_exceeded", "prompt",
           lambda: client.completions.create(model=MODEL, prompt="hello " * 10000, max_tokens=4))


class City(pydantic.BaseModel):
    """Bounded, so that any output the schema allows fits max_tokens."""
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population: int = pydantic.Field(ge=0, le=100_000_000)
    capital: bool


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de", "es"]},
                      "minItems": 1, "maxItems": 3},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@example\\.com$"},
    },
    "required": ["name", "age", "languages", "email"],
    "additionalProperties": False,
}


def check_structured_outputs(client, _args):
    # The official client's parse() with a Pydantic model, ten prompts.
    for i, city in enumerate(["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi",
                              "Quito", "Perth", "Hanoi"]):
        r = client.beta.chat.completions.parse(
            model=MODEL, response_format=City, max_tokens=120, temperature=0.7, seed=i,
            messages=[{"role": "user", "content": "Describe the city of %s." % city}])
        c = r.choices[0]
        assert c.finish_reason == "stop", (city, c)
        assert isinstance(c.message.parsed, City), (city, c.message)
    # A JSON schema holds over 20 sampled runs at temperature 1.
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(20):
        r = client.chat.completions.create(
            model=MODEL, response_format=fmt, max_tokens=150, temperature=1, seed=seed,
            messages=[{"role": "user", "content": "Invent a person."}])
        out = r.choices[0].message.content
        jsonschema.validate(json.loads(out), PERSON)
        assert r.choices[0].finish_reason == "stop", r.choices[0]
    # Streamed: the deltas make a valid value too; properties in schema order.
    chunks = client.chat.completions.create(
        model=MODEL, response_format=fmt, max_tokens=150, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Invent a person."}])
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    assert list(value) == list(PERSON["properties"]), text
    # json_object: some JSON object.
    r = client.chat.completions.create(
        model=MODEL, response_format={"type": "json_object"}, max_tokens=80, temperature=0,
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}])
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0]
    else:
        assert r.choices[0].message.content.startswith("{"), r.choices[0]
    # vLLM's guided_regex and guided_choice.
    r = client.chat.completions.create(
        model=MODEL, max_tokens=20, temperature=1, seed=1,
        messages=[{"role": "user", "content": "A date?"}],
        extra_body={"guided_regex": "20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"})
    assert re.fullmatch(r"20\d\d-(0[1-9]|1[0-2])-[0-2]\d", r.choices[0].message.content), r
    r = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=5, temperature=1, seed=2,
        extra_body={"guided_choice": ["blue", "green", "on fire"]})
    assert r.choices[0].text in ("blue", "green", "on fire"), r
    assert r.choices[0].finish_reason == "stop", r


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now in a time zone",
                                      "parameters": {"type": "object",
                                                     "properties": {"zone": {"type": "string", "maxLength": 20}},
                                                     "required": ["zone"], "additionalProperties": False}}},
]


def check_tools(client, _args):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    # `required`, one call: it names a tool and its arguments validate.
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=100, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None and len(c.message.tool_calls) == 1, c.message
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_"), call
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])
    # The loop: the call and its result go back; the model answers in text.
    msgs.append(c.message.model_dump(exclude_none=True))
    msgs.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "c"})})
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none",
                                       max_tokens=40, temperature=0)
    final = r.choices[0]
    assert final.message.tool_calls is None and final.message.content, final
    assert final.finish_reason in ("stop", "length"), final
    # A named function, streamed: deltas in OpenAI's shape, one call.
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=msgs[:1], tools=TOOLS, max_tokens=100, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}}))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0, deltas
    assert deltas[0].function.name == "get_time", deltas
    assert isinstance(json.loads(deltas[0].function.arguments)["zone"], str), deltas
    assert chunks[-1].choices[0].finish_reason == "tool_calls", chunks[-1]
    # `required` always yields arguments that parse and validate, sampled
    # at temperature 1 too (one call each: with parallel calls a small model
    # may go on calling until max_tokens cuts it).
    for seed in range(5):
        r = client.chat.completions.create(model=MODEL, messages=msgs[:1], tools=TOOLS, max_tokens=100,
                                           tool_choice="required", parallel_tool_calls=False,
                                           temperature=1, seed=seed)
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls", r.choices[0]
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])
    # `auto`: text, or calls that parse; never both broken.
    r = client.chat.completions.create(model=MODEL, messages=msgs[:1], tools=TOOLS, max_tokens=100,
                                       temperature=0)
    m = r.choices[0].message
    for call in m.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])
    assert m.tool_calls or m.content, m


def check_structured_errors(client, _args):
    chat = client.chat.completions.create
    msgs = QUESTION
    expect(openai.BadRequestError, "invalid_value", "response_format.type",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, response_format={"type": "yaml"}))
    expect(openai.BadRequestError, "missing_required_parameter", "response_format.json_schema.name",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4,
                        response_format={"type": "json_schema", "json_schema": {"schema": PERSON}}))
    # A schema the host cannot compile: refused, naming the problem.
    try:
        chat(model=MODEL, messages=msgs, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}})
        raise AssertionError("a bad schema was accepted")
    except openai.BadRequestError as e:
        assert (e.code, e.param) == ("invalid_value", "response_format"), e.body
        assert "frobnicate" in e.body["message"], e.body
    expect(openai.BadRequestError, "invalid_value", "guided_regex",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, extra_body={"guided_regex": "([a-z]"}))
    expect(openai.BadRequestError, "invalid_value", "guided_regex",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, response_format={"type": "json_object"},
                        extra_body={"guided_regex": "a+"}))
    expect(openai.BadRequestError, "invalid_value", "tool_choice",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, tools=TOOLS,
                        tool_choice={"type": "function", "function": {"name": "nope"}}))
    expect(openai.BadRequestError, "invalid_value", "tool_choice",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, tool_choice="required"))
    expect(openai.BadRequestError, "invalid_value", "tool_choice",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, tools=TOOLS, tool_choice="required",
                        response_format={"type": "json_object"}))
    expect(openai.BadRequestError, "invalid_value", "tools[0].type",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4, tools=[{"type": "retrieval"}]))
    expect(openai.BadRequestError, "invalid_value", "tools[1].function.name",
           lambda: chat(model=MODEL, messages=msgs, max_tokens=4,
                        tools=[TOOLS[0], {"type": "function", "function": {"name": "bad name!"}}]))
    expect(openai.BadRequestError, "missing_required_parameter", "messages[1].tool_call_id",
           lambda: chat(model=MODEL, max_tokens=4,
                        messages=[msgs[1], {"role": "tool", "content": "21 C"}]))


def check_embeddings(client, _args):
    def norm(v):
        return sum(x * x for x in v) ** 0.5

    # The client asks for base64 by default and decodes it.
    r = client.embeddings.create(model=MODEL, input="The capital of France is Paris.")
    assert (r.object, r.model, len(r.data)) == ("list", MODEL, 1), r
    one = r.data[0].embedding
    assert len(one) == 576 and abs(norm(one) - 1) < 1e-4, (len(one), norm(one))
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0, r.usage
    texts = ["The capital of France is Paris.", "def f(x): return x", "The capital of France is Paris."]
    r = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2], r.data
    v = [d.embedding for d in r.data]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert dot(v[0], v[2]) > 0.9999 and dot(v[0], one) > 0.9999, (dot(v[0], v[2]), dot(v[0], one))
    assert dot(v[0], v[1]) < 0.99, dot(v[0], v[1])
    # `dimensions`: the first values, normalised again.
    r = client.embeddings.create(model=MODEL, input=texts[0], dimensions=64, encoding_format="float")
    cut = r.data[0].embedding
    head = one[:64]
    assert len(cut) == 64 and abs(norm(cut) - 1) < 1e-4, len(cut)
    assert dot(cut, [x / norm(head) for x in head]) > 0.9999
    emb = client.embeddings.create
    expect(openai.BadRequestError, "invalid_value", "input", lambda: emb(model=MODEL, input=""))
    expect(openai.BadRequestError, "invalid_value", "input", lambda: emb(model=MODEL, input=[]))
    expect(openai.BadRequestError, "invalid_value", "input", lambda: emb(model=MODEL, input=[[1, 2, 3]]))
    expect(openai.BadRequestError, "invalid_value", "dimensions",
           lambda: emb(model=MODEL, input="x", dimensions=100000))
    expect(openai.BadRequestError, "invalid_value", "encoding_format",
           lambda: emb(model=MODEL, input="x", encoding_format="hex"))
    expect(openai.NotFoundError, "model_not_found", "model", lambda: emb(model="no-such-model", input="x"))
    expect(openai.BadRequestError, "context_length_exceeded", "input",
           lambda: emb(model=MODEL, input="hello " * 10000))


def check_choices(client, _args):
    # Greedy: every choice is the same answer; usage counts each.
    one = greedy_chat(client)
    r = greedy_chat(client, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2], r.choices
    assert all(c.message.content == one.choices[0].message.content for c in r.choices), r.choices
    assert r.usage.prompt_tokens == one.usage.prompt_tokens, r.usage
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens, r.usage
    # Sampled with a seed: the choices differ, and the same seed gives the
    # same choices, whole or streamed.
    story = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model=MODEL, messages=story, max_tokens=20, temperature=1.0, seed=11, n=4)
    whole = client.chat.completions.create(**kw)
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1, texts
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == texts, "n=4 with a seed is reproducible"
    streamed = ["", "", "", ""]
    finished = [None, None, None, None]
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
            finished[c.index] = c.finish_reason or finished[c.index]
    assert streamed == texts, (streamed, texts)
    assert finished == [c.finish_reason for c in whole.choices], finished
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == r.choices[1].text, r


def check_cached_tokens(client, _args):
    # The next turn of a conversation copies the KV of the last turn's
    # prompt and answer, kept after it ended: every token of the last
    # prompt and more. Sent after its caller read the answer: past the 2 s
    # after which an idle CPU pool shrinks, to its idle floor, which keeps
    # the last turn.
    first_turn = [{"role": "user", "content": f"Name a river in Europe ({time.time_ns()})."}]
    first = client.chat.completions.create(
        model=MODEL, messages=first_turn, max_tokens=24, temperature=0
    )
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens, first.usage
    next_turn = first_turn + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And one in Asia?"},
    ]
    time.sleep(3)
    second = client.chat.completions.create(
        model=MODEL, messages=next_turn, max_tokens=8, temperature=0
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens, (first.usage, second.usage)
    # Sent while another with the same messages decodes, a request copies
    # that one's KV of all its prompt but the last token (which it computes
    # for its own first token).
    running = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=400, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    try:
        for ch in running:
            if ch.choices and ch.choices[0].delta.content:
                break  # its prompt is in the KV; it decodes on
        again = greedy_chat(client)
    finally:
        running.close()
    details = again.usage.prompt_tokens_details
    assert details.cached_tokens == again.usage.prompt_tokens - 1, again.usage


def check_forbidden(_client, args):
    if not args.forbidden_url:
        print("  (skipped: no --forbidden-url)")
        return
    client = make_client(args.forbidden_url)
    assert list(client.models.list()) == [], "a forbidden model is listed"
    expect(openai.PermissionDeniedError, "model_not_allowed", "model",
           lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4))


def make_client(base_url):
    # max_retries=0: a refused request must show as its own error, not a retry.
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


CHECKS = [
    check_models,
    check_chat,
    check_chat_stream,
    check_completions,
    check_max_tokens,
    check_stop,
    check_seeded_sampling,
    check_logprobs,
    check_penalties_and_bias,
    check_errors,
    check_structured_outputs,
    check_tools,
    check_structured_errors,
    check_embeddings,
    check_choices,
    check_cached_tokens,
    check_forbidden,
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--forbidden-url")
    args = parser.parse_args()
    client = make_client(args.base_url)
    print("openai %s against %s" % (openai.__version__, args.base_url))
    failed = []
    for check in CHECKS:
        try:
            check(client, args)
            print("ok    %s" % check.__name__)
        except Exception:
            failed.append(check.__name__)
            print("FAIL  %s\n%s" % (check.__name__, traceback.format_exc()))
    print("%d checks, %d failed%s" % (len(CHECKS), len(failed), ": " + ", ".join(failed) if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
