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
configured, so a tool call (<|call|>) is shown and not executed. Ctrl-C while a reply streams
stops that reply and returns to the prompt; Ctrl-C at the prompt, Ctrl-D (EOF) or /exit quits.

Before loading anything, both commands check their arguments: the --checkpoint folder, and (from
the checkpoint's config.json) that the prompt plus --max-new-tokens stays within the model's
context and that its KV cache fits in the memory left beside the weights (``GptOss.memory_plan``):
a request that does not is refused in one line giving the largest --max-new-tokens that fits.
generate prints its figures (prompt tokens, new tokens, time to first token, decode tok/s) on
stderr once done, like the loading bar.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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


class RequestError(ValueError):
    """A request this checkpoint or this machine cannot serve (the message is one line naming the
    argument and what would be valid)."""


def _friendly(cmd):
    """Report a --device this machine cannot run (checked first), an empty --prompt, a
    --checkpoint that is not a folder, a request beyond the model's context or memory, a missing
    vocabulary or a bad checkpoint as one line (exit status 2), not a traceback."""
    def run(args):
        from .loader import CheckpointError
        from .memory import MemoryPlanError
        from .tokenizer import TokenizerError

        try:
            if getattr(args, "device", None) is not None:
                check_device(args.device)
            if args.command == "generate" and getattr(args, "prompt", None) == "":
                raise RequestError("--prompt is empty: give the text to continue")
            if getattr(args, "checkpoint", None) is not None:
                check_checkpoint_path(args.checkpoint)
            return cmd(args)
        except (DeviceError, CheckpointError, TokenizerError, MemoryPlanError, RequestError) as e:
            print(f"gptoss-kernels {args.command}: {e}", file=sys.stderr)
            return 2
    return run


def check_checkpoint_path(path: str) -> None:
    """--checkpoint names a folder (the loader then says what is wrong inside it, if anything)."""
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        raise RequestError(f"--checkpoint {path!r} is a file, not a folder: give the checkpoint folder, the one "
                           f"that holds config.json and the *.safetensors files (here perhaps {parent!r})")
    raise RequestError(f"--checkpoint {path!r}: no such folder")


def _device_of(args):
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def available_memory(device) -> int | None:
    """Bytes a new allocation may take on `device` now (None: unknown). CUDA: the driver's free
    memory. CPU: MemAvailable, within the cgroup's limit when there is one."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            room = max(0, int(limit) - used)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_request(args, config, prompt_tokens: int, device, *, what: str = "the prompt") -> None:
    """Refuse (RequestError), before loading, a request of `prompt_tokens` + --max-new-tokens
    positions that goes past the model's context (config.max_position_embeddings) or whose KV
    cache does not fit in the memory `device` has left beside the weights (GptOss.memory_plan,
    the full-layer cache rounded up to GptOss.cache_granularity as generation allocates it); the
    message gives the largest --max-new-tokens that fits."""
    import torch

    from .model import GptOss

    n = args.max_new_tokens
    ctx = config.max_position_embeddings
    limit_ctx = ctx - prompt_tokens
    G = 2 ** 30
    gran = max(1, int(GptOss.cache_granularity))
    avail = available_memory(device)
    plan, limit_mem = None, None
    if avail is not None:
        positions = min(prompt_tokens + n, ctx)
        plan = GptOss.memory_plan(config, gpu_bytes=avail, batch=1, context=-(-positions // gran) * gran,
                                  reserve_bytes=0.5e9, prefill_chunk=GptOss.prefill_chunk,
                                  weight_dtype_bytes=torch.empty((), dtype=getattr(torch, args.dtype)).element_size())
        if plan["tokens_fit"] == 0:
            raise RequestError(f"the model does not fit on {device}: weights {plan['weights_bytes'] / G:.1f} GiB + "
                               f"workspaces {plan['workspace_bytes'] / G:.2f} GiB + reserve "
                               f"{plan['reserve_bytes'] / G:.1f} GiB, {avail / G:.1f} GiB available")
        limit_mem = (plan["tokens_fit"] // gran) * gran - prompt_tokens
    best = limit_ctx if limit_mem is None else min(limit_ctx, limit_mem)
    if n <= best:
        return
    tokens = _count(prompt_tokens, "token")
    fits = f"at most {best} new tokens fit" if best >= 1 else f"{what} alone ({tokens}) leaves no room"
    if n > limit_ctx:
        raise RequestError(f"--max-new-tokens {n}: {what} ({tokens}) plus {n} new tokens exceed the model's "
                           f"context of {ctx} positions; {fits}" + (" in memory" if 1 <= best < limit_ctx else ""))
    raise RequestError(f"--max-new-tokens {n}: the KV cache of {prompt_tokens + n} positions "
                       f"({plan['kv_bytes_per_token'] * (prompt_tokens + n) / G:.1f} GiB) does not fit in the "
                       f"{avail / G:.1f} GiB of memory available on {device} (the weights take "
                       f"{plan['weights_bytes'] / G:.2f} GiB of it); {fits}")


def load_model(args):
    import torch

    from .model import GptOss

    dtype = getattr(torch, args.dtype)
    return GptOss.from_pretrained(args.checkpoint, device=_device_of(args), dtype=dtype, progress=not args.no_progress)


def report_memory(model, positions: int) -> None:
    """The memory plan of one sequence of up to `positions` positions, on stderr (CUDA only);
    raises MemoryPlanError when it does not fit."""
    if model.device.type != "cuda":
        return
    plan = model.check_memory(1, positions) if positions else model.plan_request(1, 1)
    print(f"gptoss-kernels: {model.format_memory_plan(plan)}", file=sys.stderr)


def _cmd_generate(args) -> int:
    from . import tokenizer
    from .loader import detect_layout

    _, _, config = detect_layout(args.checkpoint)
    ids = tokenizer.encode(args.prompt)   # before loading: a missing vocab fails fast
    check_request(args, config, len(ids), _device_of(args))
    model = load_model(args)
    report_memory(model, len(ids) + args.max_new_tokens)
    dec = tokenizer.IncrementalDecoder()
    out = sys.stdout
    times: list[float] = []
    t0 = time.perf_counter()
    try:
        for toks in model.stream(ids, args.max_new_tokens, args.temperature, args.top_p,
                                 stop_token_ids=[tokenizer.ENDOFTEXT], seed=args.seed):
            t = toks[0]
            if t is None:
                break
            times.append(time.perf_counter())
            if t == tokenizer.ENDOFTEXT:
                break
            out.write(dec.push(t))
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        print(f"gptoss-kernels generate: interrupted; {generation_figures(len(ids), t0, times)}", file=sys.stderr)
        return 130
    out.write("\n")
    out.flush()
    print(f"gptoss-kernels generate: {generation_figures(len(ids), t0, times)}", file=sys.stderr)
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def generation_figures(prompt_tokens: int, t0: float, times: list[float]) -> str:
    """One line: prompt tokens, new tokens (a stop token included), time to first token (from the
    call: prefill and the first sample), decode rate over the tokens after the first."""
    s = f"{_count(prompt_tokens, 'prompt token')}, {_count(len(times), 'new token')}"
    if times:
        s += f", time to first token {times[0] - t0:.3f} s"
    if len(times) >= 2 and times[-1] > times[0]:
        s += f", decode {(len(times) - 1) / (times[-1] - times[0]):.1f} tok/s"
    else:
        s += ", decode - tok/s (fewer than 2 new tokens)"
    return s


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
        self._turn_start = 0          # index in history of the current turn's user message
        self.partial = None           # (channel, content) of the message a reply was cut in

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.encoding.stop_tokens_for_assistant_actions())   # <|return|>, <|call|>

    def conversation(self):
        return self._Conversation.from_messages(self.prefix + self.history)

    def add_user(self, text: str) -> list[int]:
        """Append a user message; return the prompt tokens (conversation + <|start|>assistant)."""
        self._turn_start = len(self.history)
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
        self.partial = None
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
        except KeyboardInterrupt:
            self.partial = (parser.current_channel, parser.current_content or "")
            raise
        finally:
            msgs = list(parser.messages)
            self.history.extend(msgs)
        return msgs

    def end_interrupted_turn(self) -> bool:
        """After consume() was interrupted (Ctrl-C): keep the turn when its final answer had begun
        (the part shown becomes the answer, as chat programs keep a stopped answer); otherwise
        withdraw the user's message and what the reply had produced, so that the next message
        starts afresh. Returns whether the turn was kept."""
        channel, content = self.partial or (None, "")
        self.partial = None
        if channel == "final" and content:
            self.history.append(self._Message.from_role_and_content(self._Role.ASSISTANT, content)
                                .with_channel("final"))
            return True
        if any(getattr(m, "channel", None) == "final" for m in self.history[self._turn_start + 1:]):
            return True
        del self.history[self._turn_start:]
        return False


def _reply_tokens(model, prompt, budget, args, stop_token_ids, produced):
    """The reply's token ids as the model streams them (each also appended to `produced`)."""
    for toks in model.stream(prompt, budget, args.temperature, args.top_p, stop_token_ids=stop_token_ids,
                             seed=args.seed):
        if toks[0] is None:
            return
        produced.append(toks[0])
        yield toks[0]


def _cmd_chat(args) -> int:
    from . import tokenizer
    from .loader import detect_layout
    from .memory import MemoryPlanError

    _, _, config = detect_layout(args.checkpoint)
    session = ChatSession(tokenizer.harmony_encoding(), args.reasoning_effort, args.developer)
    # the system (and developer) messages, then --max-new-tokens: refused before loading when not
    # even the first reply could fit the model's context or the memory
    check_request(args, config, len(session.add_user("")), _device_of(args), what="the system prompt")
    session.history.clear()
    model = load_model(args)
    report_memory(model, 0)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    state = {"channel": None}
    context = config.max_position_embeddings

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
        try:
            if interactive:
                out.write("\n>>> ")
                out.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:       # Ctrl-C at the prompt quits, as Ctrl-D does
            out.write("\n")
            out.flush()
            return 0
        if not line or line.strip() in ("/exit", "/quit"):
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        turn = len(session.history)
        gen = None
        try:
            prompt = session.add_user(text)
            state["channel"] = None
            budget = min(args.max_new_tokens, context - len(prompt))
            if budget < 1:
                del session.history[turn:]
                out.write(f"\n[refused: the conversation ({len(prompt)} tokens) fills the model's context of "
                          f"{context} positions; start a new chat]\n")
                continue
            if budget < args.max_new_tokens:
                out.write(f"\n[this reply is limited to {budget} tokens: the model's context of {context} "
                          f"positions is nearly full]\n")
            produced: list[int] = []
            gen = _reply_tokens(model, prompt, budget, args, session.stop_token_ids, produced)
            try:
                msgs = session.consume(gen, on_delta)
            except MemoryPlanError as e:   # the conversation has outgrown the card: refuse this turn
                del session.history[turn:]
                out.write(f"\n[refused: {e}]\n")
                continue
            except Exception as e:  # the model produced something harmony cannot parse
                out.write(f"\n[the reply is not valid harmony output ({e}); raw text: "
                          f"{tokenizer.decode(produced)!r}]\n")
                continue
            for m in msgs:
                if getattr(m, "recipient", None):
                    out.write(f"\n[tool call to {m.recipient}: no tools are configured, not executed]\n")
            out.write("\n")
            out.flush()
        except KeyboardInterrupt:       # Ctrl-C during the turn: stop the reply, back to the prompt
            if gen is not None:
                gen.close()
                model.release_cache()   # the step may have been cut anywhere: the next reply starts afresh
            kept = len(session.history) > turn and session.end_interrupted_turn()
            if not kept:
                del session.history[turn:]
            out.write("\n[interrupted" + ("" if kept else "; your message is withdrawn") + "]\n")
            out.flush()
    return 0
