"""`gptoss-kernels generate` (raw completion) and `gptoss-kernels chat` (harmony format).

generate: encode the prompt, sample up to --max-new-tokens, print the completion as it streams,
stop on <|endoftext|> (the raw-completion stop of the reference generate.py).

chat: a read-eval loop over stdin. Each turn renders the whole conversation for completion with
openai-harmony (system message with the reasoning effort, optional developer instructions, the
history, then ``<|start|>assistant``), streams the reply through harmony's StreamableParser,
prints the analysis channel (chain of thought, marked as such) apart from the final answer, and
stops on harmony's assistant-action stop tokens (<|return|>, <|call|>). The parsed messages join
the history; harmony's renderer applies the history rules (a stored turn ends in <|end|>, earlier
analysis is dropped once a final answer followed: ``auto_drop_analysis``). No tools are
configured, so a tool call (<|call|>) is shown and not executed.
"""

from __future__ import annotations

import argparse
import sys

from .cli_args import DeviceError, check_device, non_negative_float, positive_int, probability

__all__ = ["register", "ChatSession", "load_model"]


def _add_model_args(p: argparse.ArgumentParser, *, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (HF MXFP4, HF bf16 or original layout)")
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                   help="tokens to generate, >= 1 (per turn for chat; default %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=temperature,
                   help="sampling temperature >= 0; 0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=probability, default=1.0,
                   help="nucleus sampling threshold in (0, 1] (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="activation/weight dtype (float32: CPU only, for checks)")
    p.add_argument("--no-progress", action="store_true", help="no loading progress bar")


def register(sub) -> None:
    g = sub.add_parser("generate", help="raw text completion with a gpt-oss checkpoint",
                       description="Raw completion (no chat format); stops on <|endoftext|>.")
    _add_model_args(g, temperature=1.0, max_new_tokens=256)
    g.add_argument("--prompt", required=True, help="prompt text")
    g.set_defaults(func=_friendly(_cmd_generate))

    c = sub.add_parser("chat", help="interactive chat in the harmony format",
                       description="Chat through openai-harmony; type a message per line, /exit or EOF to quit.")
    _add_model_args(c, temperature=1.0, max_new_tokens=4096)
    c.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    c.add_argument("--developer", default=None, help="developer instructions (the usual 'system prompt')")
    c.add_argument("--hide-analysis", action="store_true", help="do not print the analysis channel")
    c.set_defaults(func=_friendly(_cmd_chat))


def _friendly(cmd):
    """Report a --device this machine cannot run (checked first), a missing vocabulary or a bad
    checkpoint as one line (exit status 2), not a traceback."""
    def run(args):
        from .loader import CheckpointError
        from .memory import MemoryPlanError
        from .tokenizer import TokenizerError

        try:
            if getattr(args, "device", None) is not None:
                check_device(args.device)
            return cmd(args)
        except (DeviceError, CheckpointError, TokenizerError, MemoryPlanError) as e:
            print(f"gptoss-kernels {args.command}: {e}", file=sys.stderr)
            return 2
    return run


def load_model(args):
    import torch

    from .model import GptOss

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    return GptOss.from_pretrained(args.checkpoint, device=device, dtype=dtype, progress=not args.no_progress)


def report_memory(model, positions: int) -> None:
    """The memory plan of one sequence of up to `positions` positions, on stderr (CUDA only);
    raises MemoryPlanError when it does not fit."""
    if model.device.type != "cuda":
        return
    plan = model.check_memory(1, positions) if positions else model.plan_request(1, 1)
    print(f"gptoss-kernels: {model.format_memory_plan(plan)}", file=sys.stderr)


def _cmd_generate(args) -> int:
    from . import tokenizer

    if not args.prompt:
        print("gptoss-kernels generate: --prompt is empty: give the text to continue", file=sys.stderr)
        return 2
    ids = tokenizer.encode(args.prompt)   # before loading: a missing vocab fails fast
    model = load_model(args)
    report_memory(model, len(ids) + args.max_new_tokens)
    dec = tokenizer.IncrementalDecoder()
    out = sys.stdout
    for toks in model.stream(ids, args.max_new_tokens, args.temperature, args.top_p,
                             stop_token_ids=[tokenizer.ENDOFTEXT], seed=args.seed):
        t = toks[0]
        if t is None or t == tokenizer.ENDOFTEXT:
            break
        out.write(dec.push(t))
        out.flush()
    out.write("\n")
    return 0


class ChatSession:
    """Conversation state and harmony rendering/parsing, independent of the model (testable)."""

    def __init__(self, encoding=None, reasoning_effort: str = "medium", developer: str | None = None):
        from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, Role,
                                    SystemContent)

        from . import tokenizer

        self._Conversation, self._Message, self._Role = Conversation, Message, Role
        self.encoding = encoding or tokenizer.harmony_encoding()
        effort = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}[reasoning_effort]
        self.prefix = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort))]
        if developer:
            self.prefix.append(Message.from_role_and_content(Role.DEVELOPER,
                                                             DeveloperContent.new().with_instructions(developer)))
        self.history: list = []

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.encoding.stop_tokens_for_assistant_actions())   # <|return|>, <|call|>

    def conversation(self):
        return self._Conversation.from_messages(self.prefix + self.history)

    def add_user(self, text: str) -> list[int]:
        """Append a user message; return the prompt tokens (conversation + <|start|>assistant)."""
        self.history.append(self._Message.from_role_and_content(self._Role.USER, text))
        return self.encoding.render_conversation_for_completion(self.conversation(), self._Role.ASSISTANT)

    def consume(self, tokens, on_delta=None) -> list:
        """Feed the reply's tokens through StreamableParser. on_delta(channel, text) gets each piece
        of content as it arrives. Returns the parsed messages (added to the history). Stops at a
        stop token; on output that is not valid harmony, keeps what was parsed and raises."""
        from openai_harmony import StreamableParser

        parser = StreamableParser(self.encoding, role=self._Role.ASSISTANT)
        stops = set(self.stop_token_ids)
        ended = False
        try:
            for t in tokens:
                parser.process(int(t))
                delta = parser.last_content_delta
                if delta and on_delta is not None:
                    on_delta(parser.current_channel, delta)
                if int(t) in stops:
                    ended = True
                    break
            if not ended:
                parser.process_eos()
        finally:
            msgs = list(parser.messages)
            self.history.extend(msgs)
        return msgs


def _cmd_chat(args) -> int:
    from . import tokenizer
    from .memory import MemoryPlanError

    session = ChatSession(tokenizer.harmony_encoding(), args.reasoning_effort, args.developer)
    model = load_model(args)
    report_memory(model, 0)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    state = {"channel": None}

    def on_delta(channel, text):
        if channel != state["channel"]:
            state["channel"] = channel
            if channel == "final":
                out.write("\n[answer]\n" if not args.hide_analysis else "")
            elif not args.hide_analysis:
                out.write(f"\n[{channel or 'assistant'} (reasoning, not the answer)]\n")
        if channel == "final" or not args.hide_analysis:
            out.write(text)
            out.flush()

    while True:
        if interactive:
            out.write("\n>>> ")
            out.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        prompt = session.add_user(text)
        state["channel"] = None

        produced: list[int] = []

        def tokens():
            for toks in model.stream(prompt, args.max_new_tokens, args.temperature, args.top_p,
                                     stop_token_ids=session.stop_token_ids, seed=args.seed):
                if toks[0] is None:
                    return
                produced.append(toks[0])
                yield toks[0]

        try:
            msgs = session.consume(tokens(), on_delta)
        except MemoryPlanError as e:   # the conversation has outgrown the card: refuse this turn
            session.history.pop()
            out.write(f"\n[refused: {e}]\n")
            continue
        except Exception as e:  # the model produced something harmony cannot parse
            out.write(f"\n[the reply is not valid harmony output ({e}); raw text: {tokenizer.decode(produced)!r}]\n")
            continue
        for m in msgs:
            if getattr(m, "recipient", None):
                out.write(f"\n[tool call to {m.recipient}: no tools are configured, not executed]\n")
        out.write("\n")
        out.flush()
    return 0
