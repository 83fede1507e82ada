"""Our tokenizer and chat format as Hugging Face files, so an exported model runs in transformers alone.

    export_tokenizer(tokenizer, hf_dir)     tokenizer.json, tokenizer_config.json (with chat_template),
                                            special_tokens_map.json, generation_config.json
    config_token_ids(tokenizer)             the bos/eos/pad ids config.json must carry

Then `AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(messages, tools=tools,
sanitize_control_tokens=True)` (transformers >= 5.20; older ones ignore the flag) gives
posttrain.chat's ids, and `generate` stops at <|im_end|> (end of a turn) or <|eod|> (end of a
document, what a pretrained-only model emits).

Every single-id field says <|eod|> (id 0): pretraining put it between documents, so it is where a
text starts (bos), where one ends (eos) and harmless padding; it is also what a trainer such as
TRL's appends after each conversation, as our packing does. No bos is prepended to any encoding:
pretraining never saw one at the start of a window.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from launch.data.tokenizer import CHAT_TOKENS, EOD

# The Jinja twin of posttrain.chat.pieces (tests/test_chat.py holds them equal). transformers renders
# it with trim_blocks and lstrip_blocks; every tag strips the whitespace around it, so the only text
# is what the expressions and the delimiters write. {% generation %} marks what the model writes,
# for apply_chat_template(return_assistant_tokens_mask=True): the same tokens as our loss mask.
CHAT_TEMPLATE = """\
{%- if tools -%}
<|im_system|>tools<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
<|im_system|>{{ m.content }}<|im_end|>
{%- elif m.role == 'user' -%}
<|im_user|>{{ m.content }}<|im_end|>
{%- elif m.role == 'assistant' -%}
<|im_assistant|>
{%- generation -%}
{{ m.content or '' }}
{%- for c in m.tool_calls or [] -%}
<|tool_call_begin|>{{ c.function.name }}<|im_middle|>
{%- if c.function.arguments is string -%}
{{ c.function.arguments }}
{%- else -%}
{{ c.function.arguments | tojson }}
{%- endif -%}
<|tool_call_end|>
{%- endfor -%}
<|im_end|>
{%- endgeneration -%}
{%- elif m.role == 'tool' -%}
{%- set ns = namespace(name=m.name or '') -%}
{%- if not ns.name and m.tool_call_id is defined -%}
{%- for previous in messages[:loop.index0] -%}
{%- for c in previous.tool_calls or [] -%}
{%- if c.id is defined and c.id == m.tool_call_id -%}
{%- set ns.name = c.function.name -%}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{%- endif -%}
<|im_tool|>{{ ns.name }}<|im_middle|>{{ m.content }}<|im_end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>
{%- endif -%}"""


def config_token_ids(tokenizer) -> dict[str, int]:
    """bos_token_id, eos_token_id and pad_token_id for config.json (module docstring: all <|eod|>)."""
    return {"bos_token_id": tokenizer.eod_id, "eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.eod_id}


def _stop_ids(tokenizer) -> list[int]:
    return [tokenizer.eod_id] + [tokenizer.special_ids[t] for t in ("<|im_end|>",) if t in tokenizer.special_ids]


def _has_chat(tokenizer) -> bool:
    return all(t in tokenizer.special_ids for t in CHAT_TOKENS)


def _write(path: Path, text: str) -> None:
    # Beside the target, then renamed: an interrupted export leaves the old file or the new, never half.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _json(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def export_tokenizer(tokenizer, hf_dir: str | os.PathLike) -> Path:
    """Write the tokenizer files and generation_config.json into `hf_dir` (created if absent).

    A tokenizer without chat tokens (the bytes one, a BPE of FORMAT 1) gets no chat_template and
    stops only at <|eod|>. Replaces these four files if present; nothing else in the directory.
    """
    out = Path(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": EOD, "eos_token": EOD, "pad_token": EOD}
    extra = [t for t in CHAT_TOKENS if t in tokenizer.special_ids]
    config = {
        # The generic class that reads tokenizer.json as it is; a model-specific one (what
        # model_type deepseek_v3 would pick) rebuilds the pipeline its own way.
        "tokenizer_class": "TokenizersBackend",
        **specials,
        "extra_special_tokens": extra,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # it would turn " ." into "." and break decode(encode(s)) == s
    }
    if _has_chat(tokenizer):
        config["chat_template"] = CHAT_TEMPLATE
    config = {k: v for k, v in config.items() if v is not None}
    generation = {**config_token_ids(tokenizer), "eos_token_id": _stop_ids(tokenizer)}
    _write(out / "tokenizer.json", tokenizer.to_tokenizers().to_str(pretty=True))
    _write(out / "tokenizer_config.json", _json(config))
    _write(out / "special_tokens_map.json", _json({**specials, "additional_special_tokens": extra}))
    _write(out / "generation_config.json", _json(generation))
    return out
