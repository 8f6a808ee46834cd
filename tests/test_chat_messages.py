"""kvl.Chat: the loop from the transformers docs (send the whole ``messages`` list each turn)
under a press. Without it that loop fails at turn 2 (the press refuses a re-tokenized
conversation); with it each turn feeds only the new messages and gives exactly what an
independent loop gives, and an edited conversation starts a new stream, never continues
the old one."""

import pytest
import torch

import kvpress_lite as kvl
from kvpress_lite.cache_access import model_cache_kwarg
from test_chat import EOS, chatml_turn, reference_replies, tiny_chat_model, tiny_tokenizer

SYSTEM = "Be brief."
USERS = ["Hello there!", "What is two plus two? " * 3, "Tell me a joke.", "x" * 40, "Bye."]


def play(chat, users, max_new_tokens=10, system=SYSTEM):
    """The natural loop: append the user message, send everything, append the reply."""
    messages = [{"role": "system", "content": system}] if system else []
    replies, fed = [], []
    for user in users:
        messages.append({"role": "user", "content": user})
        text = chat.reply(messages, max_new_tokens=max_new_tokens)
        messages.append({"role": "assistant", "content": text})
        replies.append(chat.last_reply_ids)
        fed.append(chat.fed_tokens)
    return messages, replies, fed


def test_the_messages_loop_continues_exactly_like_the_reference_loop():
    model, tok = tiny_chat_model(), tiny_tokenizer()
    with kvl.Chat(model, tok, n_sink=2, capacity=24) as chat:
        messages, replies, fed = play(chat, USERS)
        assert max(chat.press.stats.cache_length) == 24 and chat.restarts == 0
        assert chat.sequences.shape[1] > 4 * 24  # streamed well past the capacity
    ref = reference_replies(model, tok, USERS, lambda k, m, last: chatml_turn(k, m, last, system=SYSTEM),
                            n_sink=2, capacity=24, max_new_tokens=10)
    assert replies == ref
    # each turn fed only its own new text, never the conversation again
    for k, user in enumerate(USERS):
        assert fed[k] == len(tok(chatml_turn(k, user, ref[k - 1][-1] if k else None, SYSTEM),
                                 add_special_tokens=False)["input_ids"])
    assert {r[-1] == EOS for r in ref[:-1]} == {True, False}  # turns after a closed and after a cut reply


def rendered(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return out if torch.is_tensor(out) else out["input_ids"]  # a BatchEncoding on transformers 5


def test_without_the_helper_the_re_rendered_loop_is_refused_at_turn_two():
    """The trap the helper exists for: re-render, re-tokenize, pass the cache back."""
    model, tok = tiny_chat_model(), tiny_tokenizer()
    messages = [{"role": "user", "content": "Hello there!"}]
    with kvl.apply_press(model, n_sink=2, capacity=24):
        ids = {"input_ids": rendered(tok, messages)}
        out = model.generate(**ids, max_new_tokens=12, eos_token_id=EOS, pad_token_id=0, return_dict_in_generate=True,
                             do_sample=False)
        reply_ids = out.sequences[0, ids["input_ids"].shape[1]:].tolist()
        # make the re-encoding differ from what was generated, as BPE merges do on real tokenizers
        messages += [{"role": "assistant", "content": tok.decode(reply_ids, skip_special_tokens=True) + " "},
                     {"role": "user", "content": "Again"}]
        again = {"input_ids": rendered(tok, messages)}
        with pytest.raises(kvl.UnsupportedGenerationError, match="edited or re-tokenized"):
            model.generate(**again, **{model_cache_kwarg(model): out.past_key_values}, max_new_tokens=4,
                           pad_token_id=0)


def test_an_edited_or_regenerated_conversation_starts_a_new_stream():
    model, tok = tiny_chat_model(), tiny_tokenizer()
    with kvl.Chat(model, tok, n_sink=2, capacity=24) as chat:
        messages, _, _ = play(chat, USERS[:3])
        edited = [dict(m) for m in messages] + [{"role": "user", "content": "Next"}]
        edited[1]["content"] = "Goodbye!"  # the first user message changed
        got = chat.reply(edited, max_new_tokens=8)
        assert chat.restarts == 1 and chat.fed_tokens == chat.sequences.shape[1] - len(chat.last_reply_ids)
        regenerated = chat.reply(edited, max_new_tokens=8)  # the same list again: a second answer to it
        assert chat.restarts == 2 and regenerated == got
    with kvl.Chat(model, tok, n_sink=2, capacity=24) as fresh:  # what a new chat answers to the edited list
        assert fresh.reply(edited, max_new_tokens=8) == got
    with kvl.Chat(model, tok, n_sink=2, capacity=24, on_edit="raise") as strict:
        messages, _, _ = play(strict, USERS[:2])
        with pytest.raises(kvl.ChatError, match="message 1 .*user.* differs"):
            strict.reply(edited, max_new_tokens=8)


def test_bad_messages_are_refused_naming_what_to_do():
    model, tok = tiny_chat_model(), tiny_tokenizer()
    with kvl.Chat(model, tok, capacity=24) as chat:
        with pytest.raises(kvl.ChatError, match="messages is empty"):
            chat.reply([])
        with pytest.raises(kvl.ChatError, match="last message is the assistant's"):
            chat.reply([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
        with pytest.raises(kvl.ChatError, match="a dict with a 'role'"):
            chat.reply(["Hi"])
    with pytest.raises(kvl.ChatError, match="on_edit must be"):
        kvl.Chat(model, tok, on_edit="continue")
    with pytest.raises(kvl.ChatError, match="no chat template"):
        kvl.Chat(model, tiny_tokenizer(template=None))


def test_an_interrupted_turn_leaves_nothing_to_continue_and_the_next_starts_anew():
    model, tok = tiny_chat_model(), tiny_tokenizer()
    with kvl.Chat(model, tok, n_sink=2, capacity=24) as chat:
        messages, _, _ = play(chat, USERS[:2])
        messages.append({"role": "user", "content": "More"})
        generate = model.generate
        model.generate = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                chat.reply(messages)
        finally:
            model.generate = generate
        got = chat.reply(messages, max_new_tokens=8)
        assert chat.sequences.shape[1] == chat.fed_tokens + len(chat.last_reply_ids)  # the whole list, fed anew
    with kvl.Chat(model, tok, n_sink=2, capacity=24) as fresh:
        assert fresh.reply(messages, max_new_tokens=8) == got


def test_chats_sharing_one_press_are_separate_streams():
    model, tok = tiny_chat_model(), tiny_tokenizer()
    alone = []
    for users in (USERS[:3], USERS[2:]):
        with kvl.Chat(model, tok, n_sink=2, capacity=24) as chat:
            alone.append(play(chat, users, max_new_tokens=6)[1])
    with kvl.apply_press(model, n_sink=2, capacity=24) as press:
        a, b = kvl.Chat(model, tok, press=press), kvl.Chat(model, tok, press=press)
        got_a, got_b, msgs_a, msgs_b = [], [], [{"role": "system", "content": SYSTEM}], [{"role": "system",
                                                                                      "content": SYSTEM}]
        for ua, ub in zip(USERS[:3], USERS[2:]):  # interleaved turns
            for chat, msgs, got, user in ((a, msgs_a, got_a, ua), (b, msgs_b, got_b, ub)):
                msgs.append({"role": "user", "content": user})
                msgs.append({"role": "assistant", "content": chat.reply(msgs, max_new_tokens=6)})
                got.append(chat.last_reply_ids)
        a.close()  # a shared press stays on the model
        assert press.stats.streams >= 2
    assert [got_a, got_b] == alone
