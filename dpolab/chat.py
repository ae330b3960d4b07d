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

Each rendering must extend the previous one (checked; the error shows where they diverge):
a template that rewrites earlier turns once later ones follow has no per-turn pieces.
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


def render_pair(row: PreferenceRow, tokenizer: Any, template_kwargs: dict | None = None
                ) -> tuple[str, list[Piece], list[Piece]]:
    """(prompt_text, chosen pieces, rejected pieces) of a conversational row.

    ``template_kwargs`` (the config's data.chat_template_kwargs) are passed to the template
    under the row's own ``chat_template_kwargs``, which win on a shared key."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{row.source}:{row.row}: the row is conversational (lists of messages) but the "
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template to render "
            f"them; use a model whose tokenizer has one (chat_template in tokenizer_config.json "
            f"or chat_template.jinja), or give prompt/chosen/rejected as plain strings")
    kwargs = {**(template_kwargs or {}), **(row.chat_template_kwargs or {})}
    render = _Renderer(tokenizer, row, kwargs)
    gen = all(c[0]["role"] == "assistant" for c in (row.chosen, row.rejected))
    prompt_text = render(row.prompt, gen=gen)
    return (prompt_text, render.pieces(prompt_text, row.chosen, "chosen", gen),
            render.pieces(prompt_text, row.rejected, "rejected", gen))


class _Renderer:
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

    def pieces(self, prompt_text: str, completion: list[dict], key: str,
               gen: bool) -> list[Piece]:
        single = len(completion) == 1
        out: list[Piece] = []
        text, have = prompt_text, "the prompt"
        for j, msg in enumerate(completion):
            assistant = msg["role"] == "assistant"
            context = self.row.prompt + completion[:j]
            if assistant and not (j == 0 and gen):    # the turn's header is not in `text` yet
                head = self(context, gen=True)
                self._check(text, head, have, f"prompt + {key}[:{j}] with the generation prompt")
                out.append(Piece(head[len(text):], scored=False))
                text, have = head, f"prompt + {key}[:{j}] with the generation prompt"
            full = self(context + [msg], gen=False)
            now = "prompt + completion" if single else f"prompt + {key}[:{j + 1}]"
            self._check(text, full, have, now)
            out.append(Piece(full[len(text):], scored=assistant))
            text, have = full, now
        return out

    def _check(self, prefix: str, full: str, prefix_name: str, full_name: str) -> None:
        if full.startswith(prefix):
            return
        at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b),
                  min(len(prefix), len(full)))
        lo = max(0, at - 20)
        raise DataError(
            f"{self.row.source}:{self.row.row}: the chat template's rendering of {prefix_name} "
            f"is not a prefix of its rendering of {full_name}; they diverge at character {at}: "
            f"prompt ...{prefix[lo:at + 20]!r} vs full ...{full[lo:at + 20]!r}")
