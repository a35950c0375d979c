"""Harmony chat: rendering round trips, the chat session's streaming parse and history rules, the
tokenizer's offline setup, and the generate/chat CLI on a tiny checkpoint (CPU)."""

from __future__ import annotations

import io
import os

import pytest

from gptoss_kernels import GptOss, GptOssConfig, tokenizer

from . import checkpoints as ck

harmony = pytest.importorskip("openai_harmony")
from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, Role,  # noqa: E402
                            SystemContent)


def _vocab_available() -> bool:
    return tokenizer.vocab_source() is not None and os.path.exists(tokenizer.vocab_source())


needs_vocab = pytest.mark.skipif(not _vocab_available(),
                                 reason="o200k_base.tiktoken not available (set TIKTOKEN_ENCODINGS_BASE)")


@pytest.fixture(scope="module")
def enc():
    if not _vocab_available():
        pytest.skip("o200k_base.tiktoken not available (set TIKTOKEN_ENCODINGS_BASE)")
    return tokenizer.harmony_encoding()


def _assistant_reply_tokens(enc, messages, stop: int) -> list[int]:
    """Tokens the model would emit after the prompt's `<|start|>assistant`, ending in `stop`."""
    toks: list[int] = []
    for m in messages:
        toks += enc.render(m)
    start = enc.render_conversation_for_completion(Conversation.from_messages([]), Role.ASSISTANT)
    assert toks[:len(start)] == start          # <|start|>assistant
    toks = toks[len(start):]
    assert toks[-1] in (tokenizer.END, tokenizer.CALL)
    return toks[:-1] + [stop]


def test_render_parse_round_trip(enc):
    msgs = [
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.HIGH)),
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Be brief.")),
        Message.from_role_and_content(Role.USER, "What is 2+2? Ünïcode ✓"),
        Message.from_role_and_content(Role.ASSISTANT, "Simple sum.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "4").with_channel("final"),
    ]
    keep = harmony.RenderConversationConfig(auto_drop_analysis=False)
    toks = enc.render_conversation(Conversation.from_messages(msgs), keep)
    back = enc.parse_messages_from_completion_tokens(toks, role=None)
    # System/developer contents come back as their rendered text; the rest exactly, and
    # re-rendering the parsed messages gives the same tokens.
    assert [m.author.role for m in back] == [m.author.role for m in msgs]
    assert [m.to_dict() for m in back[2:]] == [m.to_dict() for m in msgs[2:]]
    assert enc.render_conversation(Conversation.from_messages(back), keep) == toks
    text = enc.decode(toks)
    assert "Reasoning: high" in text and "<|channel|>analysis<|message|>Simple sum.<|end|>" in text
    # harmony's default history rule: analysis before a final answer is dropped
    dropped = enc.parse_messages_from_completion_tokens(enc.render_conversation(Conversation.from_messages(msgs)), None)
    assert [m.channel for m in dropped[2:]] == [None, "final"]


def test_tokenizer_encode_decode(enc):
    ids = tokenizer.encode("Hello<|endoftext|>")
    assert ids[-1] == tokenizer.ENDOFTEXT
    assert tokenizer.decode(ids) == "Hello<|endoftext|>"
    d = tokenizer.IncrementalDecoder()
    text = "日本語 ✓ ok"
    assert "".join(d.push(t) for t in tokenizer.encode(text)) == text


def test_tokenizer_error_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    tokenizer.harmony_encoding.cache_clear()
    try:
        with pytest.raises(tokenizer.TokenizerError, match="TIKTOKEN_ENCODINGS_BASE.*o200k_base.tiktoken"):
            tokenizer.harmony_encoding()
    finally:
        tokenizer.harmony_encoding.cache_clear()


def test_chat_session_stream_and_history(enc):
    from gptoss_kernels.cli_generate import ChatSession

    s = ChatSession(enc, reasoning_effort="low", developer="Answer in one word.")
    prompt = s.add_user("Capital of France?")
    assert prompt[-2:] == [200006, 173781]                    # <|start|>assistant
    text = enc.decode(prompt)
    assert "Reasoning: low" in text and "Answer in one word." in text
    assert set(s.stop_token_ids) == {tokenizer.RETURN, tokenizer.CALL}

    reply = [Message.from_role_and_content(Role.ASSISTANT, "User asks capital. It is Paris.").with_channel("analysis"),
             Message.from_role_and_content(Role.ASSISTANT, "Paris").with_channel("final")]
    toks = _assistant_reply_tokens(enc, reply, tokenizer.RETURN) + [1, 2, 3]   # tokens after the stop are ignored
    seen: dict[str, str] = {}
    msgs = s.consume(iter(toks), lambda ch, d: seen.__setitem__(ch, seen.get(ch, "") + d))
    assert seen == {"analysis": "User asks capital. It is Paris.", "final": "Paris"}
    assert [m.channel for m in msgs] == ["analysis", "final"]
    assert len(s.history) == 3

    # Next turn: the finished turn is stored ending in <|end|> and its analysis is dropped.
    nxt = enc.decode(s.add_user("And of Italy?"))
    assert "It is Paris." not in nxt
    assert "<|channel|>final<|message|>Paris<|end|>" in nxt and "<|return|>" not in nxt
    assert nxt.endswith("<|start|>user<|message|>And of Italy?<|end|><|start|>assistant")


def test_chat_session_tool_call_stops(enc):
    from gptoss_kernels.cli_generate import ChatSession

    s = ChatSession(enc)
    s.add_user("weather?")
    call = Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}').with_channel(
        "commentary").with_recipient("functions.get_weather").with_content_type("<|constrain|>json")
    toks = _assistant_reply_tokens(enc, [call], tokenizer.CALL)
    msgs = s.consume(iter(toks))
    assert len(msgs) == 1 and msgs[0].recipient == "functions.get_weather"


# ----------------------------------------------------------------------------------------------
# CLI on a tiny checkpoint with the real vocabulary size (so any token id is valid)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_ckpt(tmp_path_factory):
    cfg = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=201088, hidden_size=32,
                       intermediate_size=32, head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                       sliding_window=4)
    m = GptOss.from_config(cfg, seed=0)
    return ck.save_model_original(m, tmp_path_factory.mktemp("cli") / "ckpt"), m


@needs_vocab
def test_cli_generate(cli_ckpt, capsys):
    from gptoss_kernels.cli import main

    d, m = cli_ckpt
    rc = main(["generate", "--checkpoint", str(d), "--prompt", "Once upon a time", "--max-new-tokens", "5",
               "--temperature", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    want = m.generate(tokenizer.encode("Once upon a time"), 5, stop_token_ids=[tokenizer.ENDOFTEXT])
    if want and want[-1] == tokenizer.ENDOFTEXT:
        want = want[:-1]
    assert out == tokenizer.decode(want) + "\n"


@needs_vocab
def test_cli_chat(cli_ckpt, capsys, monkeypatch):
    from gptoss_kernels.cli import main

    d, _ = cli_ckpt
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n\n/exit\n"))
    rc = main(["chat", "--checkpoint", str(d), "--max-new-tokens", "4", "--temperature", "1.0", "--seed", "0",
               "--reasoning-effort", "high", "--device", "cpu", "--no-progress"])
    assert rc == 0   # a random model's reply is not valid harmony: reported, not a crash


def test_cli_parsers_registered():
    from gptoss_kernels.cli import build_parser

    p = build_parser()
    a = p.parse_args(["chat", "--checkpoint", "x", "--reasoning-effort", "low"])
    assert a.reasoning_effort == "low" and a.top_p == 1.0
    a = p.parse_args(["generate", "--checkpoint", "x", "--prompt", "hi", "--max-new-tokens", "3", "--top-p", "0.5"])
    assert a.max_new_tokens == 3 and a.top_p == 0.5



def _interrupted_after(toks, n):
    """The tokens `toks`, then Ctrl-C (KeyboardInterrupt) once `n` of them were consumed."""
    for i, t in enumerate(toks):
        if i == n:
            raise KeyboardInterrupt
        yield t


def test_chat_session_interrupted_reply(enc):
    from gptoss_kernels.cli_generate import ChatSession

    s = ChatSession(enc)
    s.add_user("First?")
    first = [Message.from_role_and_content(Role.ASSISTANT, "Yes.").with_channel("final")]
    s.consume(iter(_assistant_reply_tokens(enc, first, tokenizer.RETURN)))
    kept = list(s.history)

    # cut inside the analysis: the turn is withdrawn, the earlier one stays
    s.add_user("Second?")
    reply = [Message.from_role_and_content(Role.ASSISTANT, "Thinking about it at length.").with_channel("analysis"),
             Message.from_role_and_content(Role.ASSISTANT, "The answer is four.").with_channel("final")]
    toks = _assistant_reply_tokens(enc, reply, tokenizer.RETURN)
    with pytest.raises(KeyboardInterrupt):
        s.consume(_interrupted_after(toks, 6))
    assert s.end_interrupted_turn() is False
    assert [m.to_dict() for m in s.history] == [m.to_dict() for m in kept]

    # cut inside the final answer: the turn stays, with the answer as far as it was shown
    s.add_user("Second?")
    shown: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        s.consume(_interrupted_after(toks, len(toks) - 3), lambda ch, d: shown.append(d) if ch == "final" else None)
    assert s.end_interrupted_turn() is True
    assert s.history[-1].channel == "final" and s.history[-1].content[0].text == "".join(shown)
    assert "".join(shown) and "The answer is four.".startswith("".join(shown))
    assert [m.channel for m in s.history[len(kept) + 1:]] == ["analysis", "final"]
    # the next turn renders the stopped answer as a finished message
    nxt = enc.decode(s.add_user("Third?"))
    assert f"<|channel|>final<|message|>{''.join(shown)}<|end|>" in nxt
