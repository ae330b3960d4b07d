"""Conversational rows -> chat-template text, cut into pieces that are scored or only read.

A completion after the shared prompt may be several turns (multi-turn preference: chosen and
rejected diverge before their last turn).  The model reads every turn, but only the assistant's
own text is its action: the DPO log-ratio sums the log-probs of the assistant turns after the
divergence, and the user and tool turns between them, like the prompt, are context.

Rendering, for a completion of messages m_0 .. m_{k-1} (TRL's convention extended turn by
turn; `T(msgs, gen)` is the chat template with or without the generation prompt):

    prompt text   T(prompt, gen) with gen = every completion starts with an assistant turn
                  (then its header, e.g. "<|im_start|>assistant\\n", belongs to the prompt)
    piece of m_j  T(prompt + m_0..m_j)[len(T(prompt + m_0..m_{j-1})):]; for an assistant turn
                  whose header is not yet in the text, first an unscored header piece
                  T(prompt + m_0..m_{j-1}, gen=True)[len(previous):]
    scored        pieces of assistant turns; user, tool and header pieces are read only

These renderings are the row's `Step`s.  When each extends the previous one,
:func:`prefix_pieces` cuts them into pieces.  Some templates break that chain: the generation
prompt opens a `<think>` block the rendered turn does not have, or the reverse (DeepSeek-V3,
Nemotron 3), a turn is rewritten once later turns follow (Qwen3 drops an earlier turn's
reasoning; Qwen2.5 closes a tool result's turn only after the last of several results).  Those
rows are tokenized whole and cut at longest common prefixes (:mod:`dpolab.common_prefix`).
The template gets the row's `tools` and its `chat_template_kwargs` (over the config's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpolab.data import DataError, PreferenceRow


@dataclass(frozen=True)
class Piece:
    text: str                     # template text of one turn (or of a turn's header)
    scored: bool                  # the assistant wrote it: its tokens enter the log-ratio


@dataclass(frozen=True)
class Step:
    """One rendering of the conversation as a completion is built up turn by turn."""
    text: str                     # T(context, gen=True) for a header, else T(context + message)
    scored: bool                  # what this step adds is an assistant turn
    header: bool                  # rendered with the generation prompt: an assistant header
    name: str                     # how messages name it, e.g. "prompt + chosen[:2]"


@dataclass(frozen=True)
class Rendering:
    row: PreferenceRow
    prompt: str                   # T(prompt, gen)
    gen: bool                     # the prompt text ends with the generation prompt
    chosen: tuple[Step, ...]      # the last step is the whole conversation prompt + chosen
    rejected: tuple[Step, ...]
    render: "Renderer"            # the row's template, for the common-prefix path's checks


def render_pair(row: PreferenceRow, tokenizer: Any,
                template_kwargs: dict | None = None) -> Rendering:
    """Every rendering of a conversational row that its tokenization needs.

    ``template_kwargs`` (the config's data.chat_template_kwargs) are passed to the template
    under the row's own ``chat_template_kwargs``, which win on a shared key."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{row.source}:{row.row}: the row is conversational (lists of messages) but the "
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template to render "
            f"them; use a model whose tokenizer has one (chat_template in tokenizer_config.json "
            f"or chat_template.jinja), or give prompt/chosen/rejected as plain strings")
    kwargs = {**(template_kwargs or {}), **(row.chat_template_kwargs or {})}
    render = Renderer(tokenizer, row, kwargs)
    gen = all(c[0]["role"] == "assistant" for c in (row.chosen, row.rejected))
    return Rendering(row, render(row.prompt, gen=gen), gen,
                     _steps(render, row.prompt, row.chosen, "chosen", gen),
                     _steps(render, row.prompt, row.rejected, "rejected", gen), render)


def _steps(render: "Renderer", prompt: list[dict], completion: list[dict], key: str,
           gen: bool) -> tuple[Step, ...]:
    single = len(completion) == 1
    out: list[Step] = []
    for j, msg in enumerate(completion):
        assistant = msg["role"] == "assistant"
        context = prompt + completion[:j]
        if assistant and not (j == 0 and gen):    # the turn's header is not in the text yet
            out.append(Step(render(context, gen=True), False, True,
                            f"prompt + {key}[:{j}] with the generation prompt"))
        out.append(Step(render(context + [msg], gen=False), assistant, False,
                        "prompt + completion" if single else f"prompt + {key}[:{j + 1}]"))
    return tuple(out)


def prefix_pieces(prompt_text: str, steps: tuple[Step, ...]) -> list[Piece] | None:
    """The pieces each step adds to the previous rendering; None when some rendering does not
    extend the previous one."""
    out, text = [], prompt_text
    for step in steps:
        if not step.text.startswith(text):
            return None
        out.append(Piece(step.text[len(text):], scored=step.scored))
        text = step.text
    return out


def divergence(row: PreferenceRow, prefix: str, full: str, prefix_name: str, full_name: str,
               why: str = "") -> DataError:
    """The error for a rendering `prefix` that `full` does not extend, showing where they part."""
    at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b),
              min(len(prefix), len(full)))
    lo = max(0, at - 20)
    return DataError(
        f"{row.source}:{row.row}: the chat template's rendering of {prefix_name} is not a prefix "
        f"of its rendering of {full_name}{why}; they diverge at character {at}: "
        f"prompt ...{prefix[lo:at + 20]!r} vs full ...{full[lo:at + 20]!r}")


class Renderer:
    def __init__(self, tokenizer: Any, row: PreferenceRow, kwargs: dict):
        self.tokenizer, self.row, self.kwargs = tokenizer, row, kwargs

    def __call__(self, messages: list[dict], *, gen: bool) -> str:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=self.row.tools, tokenize=False, add_generation_prompt=gen,
                **self.kwargs)
        except (jinja2.TemplateError, TypeError, ValueError) as err:
            # e.g. a template that concatenates 'content' meets a tool-call turn without text,
            # or calls raise_exception on a role order it does not support
            raise DataError(f"{self.row.source}:{self.row.row}: the chat template cannot render "
                            f"this row ({len(messages)} messages, "
                            f"{'with' if gen else 'without'} the generation prompt): "
                            f"{type(err).__name__}: {err}") from None
