"""The Ollama `Modelfile` written next to a GGUF export, with each built-in chat template as a Go template.

Ollama renders prompts with Go's text/template, not Jinja. For every built-in template of
sftlab.data.chat_templates, TEMPLATES holds a Go template that renders a conversation ending in a user
(or tool) message exactly as the Jinja one does with add_generation_prompt=True, so the model sees at
inference the text it was trained on. What Ollama hands a template (its template/template.go):

    .Messages   the conversation; consecutive messages of one role (tools excepted) joined by blank lines
                .Role .Content .Thinking .ToolCalls (each .Function.Name, .Function.Arguments)
    .System     every system message's text joined by blank lines (the Modelfile SYSTEM when the request
                has none); each template reads the system text from here, as its Jinja reads messages[0]
    .Tools      the request's tool schemas; `json` marshals a value like Go's encoding/json

Conventions shared by all templates, as in Ollama's own:
- The BOS token that opens a Jinja render is left to the runner, which prepends it when the GGUF's
  tokenizer.ggml.add_bos_token says so; BOS and EOS tokens inside the conversation are written here.
- A conversation ending in an assistant message is left open after its text, so the model continues
  it (Ollama's prefill); only a final user or tool message gets the generation prompt.
- No whitespace trim markers ({{- -}}): every character outside {{ }} is output as written.

Known differences from the Jinja render, where Go templates cannot follow:
- JSON (tool schemas, call arguments, mistral's tool results): `json` writes compact JSON and escapes
  <, > and & as \\u003c..., Jinja's tojson writes `{"a": 1}`; the values are the same, the spacing
  is not, and Go cannot reformat it (no such function), so tool turns match only up to JSON layout.
- llama3 and gemma trim contents (Jinja's `trim`); here only ASCII whitespace is trimmed, so a content
  that starts or ends with a non-ASCII space (U+00A0, U+3000, ...) keeps it.
- llama3 trims the system text and leaves out an empty system turn: a whitespace-only system text
  gives an empty system turn here.
- deepseek drops earlier reasoning only where Ollama split it out of the reply (see DEEPSEEK); a reply
  whose content still holds `...</think>` (thinking turned off, a client sending raw text) keeps it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

# The Modelfile's quotes: a value is written bare, in quotes or in triple quotes.
_Q, _Q3 = '"', '"""'

# Loop head of every template: `$last` is true on the conversation's final message.
_LOOP = "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
# A message closes its turn unless it is the final assistant message, which Ollama continues.
_CLOSED = '(or (ne .Role "assistant") (not $last))'
# The generation prompt follows a final user, tool or system message.
_GENERATE = 'and $last (ne .Role "assistant")'

# The bytes Python's str.strip() removes among ASCII: \t \n \v \f \r, \x1c-\x1f and the space.
_WS = "9 10 11 12 13 28 29 30 31 32"

# Jinja's `| trim` of a string. Go templates have no string functions, so the ends are found a byte at
# a time; `range` over an integer needs Go >= 1.22's text/template (Ollama's go.mod asks for 1.26). The
# loops run only when an end is whitespace, and stop at the first other byte. `slice $s 1` has length
# len-1, so `len (slice $tail $k)` counts down from the last index: Go templates have no subtraction.
_TRIM = (
    '{{ define "trim" }}{{ $s := . }}{{ $n := len $s }}'
    "{{ if not $n }}"
    f"{{{{ else if not (or (eq (index $s 0) {_WS}) (eq (index $s (len (slice $s 1))) {_WS})) }}}}{{{{ $s }}}}"
    "{{ else }}{{ $start := $n }}{{ $end := 0 }}{{ $tail := slice $s 1 }}"
    f"{{{{ range $k := $n }}}}{{{{ if not (eq (index $s $k) {_WS}) }}}}{{{{ $start = $k }}}}{{{{ break }}}}{{{{ end }}}}{{{{ end }}}}"
    "{{ range $k := $n }}{{ $p := len (slice $tail $k) }}"
    f"{{{{ if not (eq (index $s $p) {_WS}) }}}}{{{{ $end = $p }}}}{{{{ break }}}}{{{{ end }}}}{{{{ end }}}}"
    # s[start:end+1], written as s[start:end] and the byte at end (bytes concatenate back into UTF-8)
    "{{ if lt $start $n }}{{ slice $s $start $end }}{{ slice (slice $s $end) 0 1 }}{{ end }}"
    "{{ end }}{{ end }}"
)

CHATML = (
    _LOOP + "<|im_start|>{{ .Role }}\n{{ .Content }}"
    f"{{{{ if {_CLOSED} }}}}<|im_end|>\n{{{{ end }}}}"
    f"{{{{ if {_GENERATE} }}}}<|im_start|>assistant\n{{{{ end }}}}"
    "{{ end }}"
)

# Ollama finds the text a model opens tool calls with in the first `{{ if .ToolCalls }}` (a bare
# .ToolCalls argument) and its first text: here `<tool_call>`; so the plain-reply test hides .ToolCalls
# inside parentheses, where that search does not look.
QWEN = (
    "{{ if .Tools }}<|im_start|>system\n{{ if .System }}{{ .System }}\n\n{{ end }}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{{ range .Tools }}\n{{ json . }}{{ end }}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{{ else if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{ $prev := "" }}'
    + _LOOP
    + '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant'
    "{{ if or .Content (not .ToolCalls) }}\n{{ .Content }}{{ end }}"
    '{{ if .ToolCalls }}{{ range .ToolCalls }}\n<tool_call>\n{"name": "{{ .Function.Name }}", '
    '"arguments": {{ json .Function.Arguments }}}\n</tool_call>{{ end }}{{ end }}'
    f"{{{{ if {_CLOSED} }}}}<|im_end|>\n{{{{ end }}}}"
    # consecutive tool results share one user turn
    '{{ else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}'
    "\n<tool_response>\n{{ .Content }}\n</tool_response>"
    '{{ if or $last (ne (index (slice $.Messages $i) 1).Role "tool") }}<|im_end|>\n{{ end }}'
    "{{ end }}"
    f"{{{{ if {_GENERATE} }}}}<|im_start|>assistant\n{{{{ end }}}}"
    "{{ $prev = .Role }}{{ end }}"
)

# Every user turn but the first opens with BOS (the first one's is the runner's); the system text
# goes into the first [INST] block.
LLAMA2 = (
    '{{ $bos := "<s>" }}{{ $eos := "</s>" }}{{ $first := true }}'
    + _LOOP
    + '{{ if eq .Role "user" }}{{ if not $first }}{{ $bos }}{{ end }}[INST] '
    "{{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
    '{{ else if ne .Role "system" }} {{ .Content }}'
    f"{{{{ if {_CLOSED} }}}} {{{{ $eos }}}}{{{{ end }}}}{{{{ end }}}}"
    '{{ if ne .Role "system" }}{{ $first = false }}{{ end }}'
    "{{ end }}"
)

# Several tool calls are joined by newlines, so the first text in the tool-call branch is "\n" and
# Ollama watches for a bare JSON object `{`, which is how this layout calls tools.
LLAMA3 = (
    "{{ if or .System .Tools }}<|start_header_id|>system<|end_header_id|>\n\n"
    '{{ if .System }}{{ template "trim" .System }}{{ end }}'
    "{{ if .Tools }}{{ if .System }}\n\n{{ end }}Environment: ipython\n\n"
    "You have access to the following functions. To call a function, respond with a JSON object of the "
    'form {"name": function name, "parameters": dictionary of argument names and values}.'
    "{{ range .Tools }}\n\n{{ json . }}{{ end }}{{ end }}<|eot_id|>{{ end }}"
    + _LOOP
    + '{{ if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n'
    "{{ if .ToolCalls }}{{ range $j, $call := .ToolCalls }}{{ if $j }}\n{{ end }}"
    '{"name": "{{ .Function.Name }}", "parameters": {{ json .Function.Arguments }}}{{ end }}'
    '{{ else }}{{ template "trim" .Content }}{{ end }}'
    "{{ if not $last }}<|eot_id|>{{ end }}"
    '{{ else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
    '{{ else if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    '{{ template "trim" .Content }}<|eot_id|>{{ end }}'
    f"{{{{ if {_GENERATE} }}}}<|start_header_id|>assistant<|end_header_id|>\n\n{{{{ end }}}}"
    "{{ end }}" + _TRIM
)

# Tools go before the last user message; the system text joins the user message only when that is the
# conversation's final message (as in the Jinja: after a tool result it is left out).
MISTRAL = (
    '{{ $eos := "</s>" }}{{ $lastUser := -1 }}'
    '{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}'
    + _LOOP
    + '{{ if eq .Role "user" }}'
    "{{ if and $.Tools (eq $i $lastUser) }}[AVAILABLE_TOOLS] {{ json $.Tools }}[/AVAILABLE_TOOLS]{{ end }}"
    "[INST] {{ if and $last $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
    '{{ else if eq .Role "assistant" }}'
    "{{ if .ToolCalls }}[TOOL_CALLS] [{{ range $j, $call := .ToolCalls }}{{ if $j }}, {{ end }}"
    '{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}{{ end }}]'
    "{{ else }} {{ .Content }}{{ end }}"
    "{{ if not $last }}{{ $eos }}{{ end }}"
    '{{ else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ json .Content }}}[/TOOL_RESULTS]'
    "{{ end }}{{ end }}"
)

# No system role: its text opens the first turn.
GEMMA = (
    "{{ $first := true }}"
    + _LOOP
    + '{{ if ne .Role "system" }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
    '{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ template "trim" .Content }}'
    f"{{{{ if {_CLOSED} }}}}<end_of_turn>\n{{{{ end }}}}{{{{ $first = false }}}}{{{{ end }}}}"
    f"{{{{ if {_GENERATE} }}}}<start_of_turn>model\n{{{{ end }}}}"
    "{{ end }}" + _TRIM
)

PHI3 = (
    _LOOP + "<|{{ .Role }}|>\n{{ .Content }}"
    f"{{{{ if {_CLOSED} }}}}<|end|>\n{{{{ end }}}}"
    f"{{{{ if {_GENERATE} }}}}<|assistant|>\n{{{{ end }}}}"
    "{{ end }}"
)

# Earlier replies lose their reasoning, and the generation prompt opens <think>. Go templates cannot
# search a string for </think> (a scan a byte at a time costs ~4 us a byte on every render), so the
# reasoning is dropped the way Ollama can: the never-rendered `and false .Thinking` branch shows Ollama
# the <think>...</think> tags, so it gives the model the thinking capability and moves the reasoning of
# each reply into .Thinking (the prompt ending in <think> tells it the block is open). The content it
# keeps starts after the whitespace that followed </think>; the Jinja keeps that whitespace, "\n\n" as
# sftlab's training data and the R1 models write it.
DEEPSEEK = (
    "{{ .System }}" + _LOOP + '{{ if eq .Role "user" }}<｜User｜>{{ .Content }}'
    '{{ else if eq .Role "assistant" }}<｜Assistant｜>{{ if .Thinking }}\n\n{{ end }}{{ .Content }}'
    "{{ if not $last }}<｜end▁of▁sentence｜>{{ end }}"
    "{{ if and false .Thinking }}<think>{{ .Thinking }}</think>{{ end }}"
    "{{ end }}"
    f"{{{{ if {_GENERATE} }}}}<｜Assistant｜><think>\n{{{{ end }}}}"
    "{{ end }}"
)

ALPACA = (
    '{{ $eos := "</s>" }}'
    "{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.{{ end }}"
    + _LOOP
    + '{{ if eq .Role "user" }}\n\n### Instruction:\n{{ .Content }}'
    '{{ else if ne .Role "system" }}\n\n### Response:\n{{ .Content }}'
    f"{{{{ if {_CLOSED} }}}}{{{{ $eos }}}}{{{{ end }}}}{{{{ end }}}}"
    f"{{{{ if {_GENERATE} }}}}\n\n### Response:\n{{{{ end }}}}"
    "{{ end }}"
)

TEMPLATES: dict[str, str] = {"chatml": CHATML, "qwen": QWEN, "llama2": LLAMA2, "llama3": LLAMA3,
                             "mistral": MISTRAL, "gemma": GEMMA, "phi3": PHI3, "deepseek": DEEPSEEK,
                             "alpaca": ALPACA}  # fmt: skip


def go_template(name: str, bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """TEMPLATES[name] with the tokenizer's BOS and EOS where the Jinja writes bos_token/eos_token
    inside the conversation (llama2, mistral, alpaca); TEMPLATES has Llama 2's <s> and </s>."""
    text = TEMPLATES[name]
    # json.dumps quotes a string the way a Go string literal reads it (no \/ and no surrogates here)
    text = text.replace(
        '$bos := "<s>"', f"$bos := {json.dumps(bos_token, ensure_ascii=False)}"
    )
    return text.replace(
        '$eos := "</s>"', f"$eos := {json.dumps(eos_token, ensure_ascii=False)}"
    )


def modelfile(
    gguf_name: str,
    template: str,
    stop: list[str],
    system: str | None,
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
) -> tuple[str, str | None]:
    """(Modelfile text, note or None) for `ollama create` next to the GGUF file `gguf_name`.

    `template` is the run's data.template: a built-in name gets its Go TEMPLATE (with the run
    tokenizer's bos_token and eos_token, see go_template); "auto" or a template file gets none, and
    Ollama picks one from the GGUF's embedded chat template. `stop`: the end-of-turn tokens."""
    notes = []
    lines = ["FROM " + _required("./" + gguf_name, ("", _Q), "the GGUF name")]
    lines += [
        "PARAMETER stop " + _required(token, (_Q, _Q3), "a stop token")
        for token in stop
    ]
    if system:
        quoted = _value(system, (_Q3, _Q))
        if quoted is None:
            notes.append("the system text has a line ending in \"\"\", which no Modelfile quoting can hold; "
                         "the Modelfile has no SYSTEM: send the system message with each request")  # fmt: skip
        else:
            lines.append("SYSTEM " + quoted)
    if template in TEMPLATES:
        text = go_template(template, bos_token, eos_token)
        lines.append("TEMPLATE " + _required(text, (_Q3,), "the template"))
    else:
        notes.append(
            f"data.template is {template!r}, not a built-in, so the Modelfile has no TEMPLATE: Ollama reads "
            "the GGUF's embedded tokenizer.chat_template and uses the closest of the templates it knows, "
            "falling back to the bare prompt when none is close; check `ollama show MODEL --template`"
        )
    return "\n".join(lines) + "\n", "; ".join(notes) or None


def create_command(model_name: str, modelfile_path) -> str:
    """The shell line that loads the Modelfile (and the GGUF beside it) into Ollama."""
    return f"ollama create {shlex.quote(model_name)} -f {shlex.quote(str(Path(modelfile_path)))}"


def _value(text: str, quotes: tuple[str, ...]) -> str | None:
    """`text` in the first of `quotes` ("" for none) that Ollama's Modelfile parser reads back unchanged.

    The parser has no escapes: a quoted value is what lies between the first and the last quote (or
    triple quote), so quotes and backslashes inside are written as they are. The value ends at the
    first line end where the text so far is one whole quoted string, which rules out a line inside it
    that ends with the closing quote; so each form is kept only if it reads back as `text`."""
    return next(
        (q + text + q for q in quotes if _read_back(q + text + q) == text), None
    )


def _required(text: str, quotes: tuple[str, ...], what: str) -> str:
    value = _value(text, quotes)
    if value is None:
        raise ValueError(
            f"{what} {text!r} cannot be written in a Modelfile (a line of it ends in a quote)"
        )
    return value


def _read_back(written: str) -> str | None:
    """The value Ollama's Modelfile parser takes from `written` followed by a line end, or None if the
    value ends before that line end (the rest would be read as another command)."""
    buffer = ""
    for i, ch in enumerate(written + "\n"):
        if ch in "\r\n":
            value = _unquote(buffer.strip())
            if value is not None:
                return value if i == len(written) else None
            buffer += ch
        elif ch in " \t" or ch.isprintable():  # it drops other unprintable characters
            buffer += ch
    return None


def _unquote(s: str) -> str | None:
    if s.startswith('"""'):
        return s[3:-3] if len(s) >= 6 and s.endswith('"""') else None
    if s.startswith('"'):
        return s[1:-1] if len(s) >= 2 and s.endswith('"') else None
    return s
