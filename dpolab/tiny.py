"""Tiny random causal LMs and a tiny tokenizer, for tests and benchmarks.

Everything here is built offline and deterministically: the tokenizer is a byte-level BPE
trained on a small corpus generated from a seeded `random.Random`, the models are random-init
transformers models whose init draws from a seeded, forked torch RNG.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

# ChatML, the format of SmolLM2 and Qwen2.5: <|im_start|>role\ncontent<|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML with tools, after Qwen2.5's template: the tools column as JSON lines in a system turn,
# an assistant's tool calls as <tool_call> JSON blocks (arguments given as a JSON string are
# written as they are, an object as JSON), and consecutive tool results as <tool_response>
# blocks in one user turn, which closes only after the last of them.
CHATML_TOOLS_TEMPLATE = (
    r"{%- set first_system = messages and messages[0]['role'] == 'system' %}"
    r"{%- if tools %}{{- '<|im_start|>system\n' }}"
    r"{%- if first_system %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    r"{{- '# Tools\n<tools>' }}{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    r"{{- '\n</tools><|im_end|>\n' }}"
    r"{%- elif first_system %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    r"{%- endif %}"
    r"{%- for message in messages %}"
    r"{%- if message.role == 'system' and loop.first %}"
    r"{%- elif message.role != 'tool' and not message.tool_calls %}"
    r"{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    r"{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    r"{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    r"{%- for call in message.tool_calls %}"
    r"{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    r"""{{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}"""
    r"{%- if call.arguments is string %}{{- call.arguments }}"
    r"{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    r"{{- '}\n</tool_call>' }}"
    r"{%- endfor %}{{- '<|im_end|>\n' }}"
    r"{%- else %}"
    r"{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    r"{{- '<|im_start|>user' }}{%- endif %}"
    r"{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    r"{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    r"{{- '<|im_end|>\n' }}{%- endif %}"
    r"{%- endif %}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Tags that Qwen-family vocabularies hold as single tokens, added to the tools variant.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
               "<think>", "</think>"]

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a small bird", "the old man",
             "our team", "the river", "a young girl", "the machine", "this answer", "the model"]
_VERBS = ["sees", "likes", "helps", "follows", "writes", "reads", "explains", "prefers",
          "answers", "finds", "carries", "remembers", "chooses", "rejects", "learns"]
_OBJECTS = ["the red ball", "a long letter", "the quiet house", "an honest reply",
            "the green field", "a short story", "the first question", "a better answer",
            "the morning light", "two apples", "the open door", "a helpful summary"]
_TAILS = ["today.", "every day.", "with care.", "before noon.", "in the garden.",
          "without a word.", "again and again.", "because it is kind.", "near the sea.",
          "and then smiles.", "? Yes, it does.", "! That is good."]


def tiny_corpus(*, lines: int = 300, seed: int = 0) -> list[str]:
    """`lines` simple English sentences drawn from fixed word lists by `random.Random(seed)`."""
    rng = random.Random(seed)
    return [" ".join([rng.choice(_SUBJECTS).capitalize(), rng.choice(_VERBS),
                      rng.choice(_OBJECTS), rng.choice(_TAILS)]) + f" {rng.randrange(100)}"
            for _ in range(lines)]


def tiny_tokenizer(*, vocab_size: int = 512, seed: int = 0, tools: bool = False):
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML specials, trained in well under 1 s.

    Specials `<|im_start|>`, `<|im_end|>` (eos), `<|pad|>` (pad) take ids 0, 1, 2; the 256 byte
    symbols follow, merges fill the rest up to `vocab_size` (fewer if the corpus runs out of
    pairs). The BPE trainer is deterministic for a fixed corpus, so the same arguments give the
    same vocabulary on every call.  `tools`: the template renders tools and tool calls
    (CHATML_TOOLS_TEMPLATE) and TOOL_TOKENS are added as single tokens after the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tiny_corpus(seed=seed), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|pad|>", bos_token=None,
                                 chat_template=CHATML_TOOLS_TEMPLATE if tools else CHATML_TEMPLATE)
    if tools:
        hf.add_tokens(TOOL_TOKENS)
    return hf


ARCHS = ("llama", "qwen2", "gemma3", "gpt2")  # and every model type of dpolab.tiny_archs


def _config(arch: str, *, vocab_size: int, hidden_size: int, layers: int, heads: int):
    """A transformers config of family `arch` ("llama", "qwen2", "gemma3", "gpt2", or a model
    type of dpolab.tiny_archs.ARCHITECTURES)."""
    import transformers as tf

    from dpolab import tiny_archs

    if arch in tiny_archs.ARCHITECTURES:
        return tiny_archs.config(arch, vocab_size=vocab_size, hidden_size=hidden_size,
                                 layers=layers, heads=heads)

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=2 * hidden_size,
                  max_position_embeddings=512, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=max(1, heads // 2))
    if arch == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=max(1, heads // 2))
    if arch == "gemma3":
        # softcapping on so tests exercise Head.softcap; the sliding window exceeds the tiny
        # sequences, so every layer is full attention in effect.
        return tf.Gemma3TextConfig(**common, num_key_value_heads=max(1, heads // 2),
                                   head_dim=hidden_size // heads, final_logit_softcapping=30.0)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers,
                             n_head=heads, n_positions=512, bos_token_id=None,
                             eos_token_id=1, pad_token_id=2)
    raise ValueError(f"unknown tiny arch {arch!r}; valid: "
                     f"{', '.join(ARCHS + tiny_archs.ARCHITECTURES)}")


def tiny_model(*, vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
               seed: int = 0, arch: str = "llama"):
    """A random-init float32 causal LM of family `arch`, in eval mode.

    transformers' weight init draws from the global torch RNG and takes no generator, so the
    init runs inside `torch.random.fork_rng()` after `torch.manual_seed(seed)`: the result
    depends on `seed` only, and the caller's RNG state is restored afterwards.
    """
    from transformers import AutoModelForCausalLM

    config = _config(arch, vocab_size=vocab_size, hidden_size=hidden_size, layers=layers,
                     heads=heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny(dir: str | Path, *, vocab_size: int = 512, seed: int = 0, hidden_size: int = 64,
              layers: int = 2, heads: int = 4, arch: str = "llama", tools: bool = False) -> Path:
    """Write a tiny model (safetensors) and its tokenizer to `dir`; returns the folder.

    The model's vocabulary is the tokenizer's actual size, so every id it emits is valid.
    `tools`: the tokenizer's tools variant (see tiny_tokenizer).
    """
    from transformers import AutoTokenizer

    dir = Path(dir)
    tokenizer = tiny_tokenizer(vocab_size=vocab_size, seed=seed, tools=tools)
    rows = len(tokenizer)
    for _ in range(2):
        model = tiny_model(vocab_size=rows, hidden_size=hidden_size, layers=layers,
                           heads=heads, seed=seed, arch=arch)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(dir)
        tokenizer.save_pretrained(dir)
        # Read back, the folder's tokenizer is the class its model type names, which may add
        # tokens of its own (Qwen2's <|endoftext|>): the model gets a row for each.
        loaded = len(AutoTokenizer.from_pretrained(dir))
        if loaded == rows:
            return dir
        rows = loaded
    raise RuntimeError(f"tiny {arch}: the saved tokenizer keeps changing size ({rows})")


def qwen_shape_config():
    """A Qwen2 config of Qwen2.5-0.5B's shape, for random-init GPU benchmarks (no download).

    hidden 896, 24 layers, 14 query / 2 key-value heads, MLP 4864, vocab 151936, tied
    embeddings: about 494M parameters, 136M of them in the embedding.
    """
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
