"""The Ollama Modelfile: its lines as Ollama's Modelfile parser reads them back, and each built-in template's Go
TEMPLATE rendered by Go's text/template the way Ollama calls it (collated messages, the `json` function,
missingkey=zero), against the Jinja template rendered as sftlab renders it in training. The Go tests need a `go`
binary (Debian: golang-go) and skip without one."""

import json
import os
import re
import shutil
import subprocess

import pytest

from sftlab.data.chat_templates import BUILTIN
from sftlab.data.conversation import Message
from sftlab.data.templates import ChatTemplate
from sftlab.export.ollama import TEMPLATES, create_command, go_template, modelfile

# Renders Ollama-style: collates the messages as Ollama's template.Execute does and hands the template the same
# data, with tool-call arguments kept in their order (as Ollama's ordered map does). Also reports the tool-call
# opening and the thinking tags Ollama infers from a template's parse tree (the heuristics of its
# tools/template.go and thinking/template.go, written here after their description).
GO_RENDERER = r"""
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type ToolCall struct {
	Function struct {
		Index     int             `json:"index,omitempty"`
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking,omitempty"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	ToolName  string     `json:"tool_name,omitempty"`
}

type Tool struct {
	Type     string `json:"type"`
	Function struct {
		Name        string          `json:"name"`
		Description string          `json:"description"`
		Parameters  json.RawMessage `json:"parameters"`
	} `json:"function"`
}

type Case struct {
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

type Result struct {
	Text  *string `json:"text,omitempty"`
	Error string  `json:"error,omitempty"`
}

// Every system text joined for .System; consecutive messages of one role merged, tool results excepted.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			out[len(out)-1].Content += "\n\n" + msgs[i].Content
		} else {
			out = append(out, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), out
}

func namesToolCalls(p *parse.PipeNode) bool {
	for _, c := range p.Cmds {
		for _, a := range c.Args {
			if f, ok := a.(*parse.FieldNode); ok {
				for _, id := range f.Ident {
					if id == "ToolCalls" {
						return true
					}
				}
			}
		}
	}
	return false
}

// The first text in nodes, not looking past an action or into more than one branch.
func firstText(nodes []parse.Node) *parse.TextNode {
	for _, n := range nodes {
		var lists []*parse.ListNode
		switch n := n.(type) {
		case *parse.TextNode:
			return n
		case *parse.ActionNode:
			return nil
		case *parse.ListNode:
			if t := firstText(n.Nodes); t != nil {
				return t
			}
			continue
		case *parse.IfNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.RangeNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.WithNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		default:
			continue
		}
		for _, l := range lists {
			if l != nil {
				if t := firstText(l.Nodes); t != nil {
					return t
				}
			}
		}
		return nil
	}
	return nil
}

// The first {{ if }} whose condition names .ToolCalls itself, depth first.
func toolCallIf(nodes []parse.Node) *parse.IfNode {
	for _, n := range nodes {
		var lists []*parse.ListNode
		switch n := n.(type) {
		case *parse.IfNode:
			if namesToolCalls(n.Pipe) {
				return n
			}
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.RangeNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.WithNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.ListNode:
			lists = []*parse.ListNode{n}
		}
		for _, l := range lists {
			if l != nil {
				if found := toolCallIf(l.Nodes); found != nil {
					return found
				}
			}
		}
	}
	return nil
}

func toolTag(t *template.Template) string {
	tag := ""
	if n := toolCallIf(t.Tree.Root.Nodes); n != nil {
		if text := firstText(n.List.Nodes); text != nil {
			tag = strings.Split(strings.TrimSpace(string(text.Text)), "{")[0]
		}
	}
	if tag == "" {
		return "{"
	}
	return tag
}

// Around each .Thinking inside a range over .Messages: the first and last texts of its nearest list.
func thinkTags(t *template.Template) [2]string {
	var tags [2]string
	var stack []parse.Node
	var visit func(n parse.Node)
	visit = func(n parse.Node) {
		if n == nil {
			return
		}
		stack = append(stack, n)
		defer func() { stack = stack[:len(stack)-1] }()
		var children []parse.Node
		switch n := n.(type) {
		case *parse.ListNode:
			if n != nil {
				children = n.Nodes
			}
		case *parse.IfNode:
			children = []parse.Node{n.Pipe, n.List, n.ElseList}
		case *parse.RangeNode:
			children = []parse.Node{n.Pipe, n.List, n.ElseList}
		case *parse.WithNode:
			children = []parse.Node{n.Pipe, n.List, n.ElseList}
		case *parse.ActionNode:
			children = []parse.Node{n.Pipe}
		case *parse.PipeNode:
			for _, c := range n.Cmds {
				children = append(children, c)
			}
		case *parse.CommandNode:
			children = n.Args
		case *parse.FieldNode:
			if n.Ident[0] == "Thinking" {
				thinking(stack, &tags)
			}
		}
		for _, c := range children {
			if l, ok := c.(*parse.ListNode); ok && l == nil {
				continue
			}
			if p, ok := c.(*parse.PipeNode); ok && p == nil {
				continue
			}
			visit(c)
		}
	}
	visit(t.Tree.Root)
	return tags
}

func thinking(stack []parse.Node, tags *[2]string) {
	var rng *parse.RangeNode
	for i := len(stack) - 1; i >= 0 && rng == nil; i-- {
		rng, _ = stack[i].(*parse.RangeNode)
	}
	if rng == nil || !strings.Contains(rng.Pipe.String(), ".Messages") {
		return
	}
	for i := len(stack) - 1; i >= 0; i-- {
		if l, ok := stack[i].(*parse.ListNode); ok {
			if t, ok := l.Nodes[0].(*parse.TextNode); ok {
				tags[0] = strings.TrimSpace(string(t.Text))
			}
			if t, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
				tags[1] = strings.TrimSpace(string(t.Text))
			}
			return
		}
	}
}

func main() {
	var in struct {
		Template string `json:"template"`
		Cases    []Case `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		panic(err)
	}
	results := []Result{}
	for _, c := range in.Cases {
		system, messages := collate(c.Messages)
		data := map[string]any{"System": system, "Messages": messages, "Tools": c.Tools, "Response": "",
			"Think": false, "IsThinkSet": false}
		var b bytes.Buffer
		if err := tmpl.Execute(&b, data); err != nil {
			results = append(results, Result{Error: err.Error()})
		} else {
			s := b.String()
			results = append(results, Result{Text: &s})
		}
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"renders": results, "tool_tag": toolTag(tmpl),
		"think_tags": thinkTags(tmpl)})
}
"""

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a <city> & region",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CALL = {
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}},
}
SYSTEM = Message("system", "Be brief.")


def user(text):
    return Message("user", text)


def reply(text, **kw):
    return Message("assistant", text, **kw)


def result(text):
    return Message("tool", text, name="get_weather")


THREE_TURNS = [
    user("What is 2+2?"),
    reply("2+2 = 4."),
    user("And 3+3?"),
    reply("It is 6."),
    user("And 4+4?"),
]
CASES = {
    "single": [user("What is 2+2?")],
    "system": [SYSTEM, user("What is 2+2?")],
    "three turns": THREE_TURNS,
    "three turns, system": [SYSTEM, *THREE_TURNS],
    "unicode": [
        Message("system", 'Say "ok" \\ 你好'),
        user("ßé 你好?"),
        reply("好。"),
        user("再见"),
    ],
    "padded": [
        SYSTEM,
        user("  What is 2+2? \n"),
        reply("\n 4.\t "),
        user("\tAnd 3+3?"),
    ],
}
TOOL_CASES = {
    "call and result": [
        user("Weather in Paris?"),
        reply("", tool_calls=(CALL,)),
        result('{"temp": 20}'),
    ],
    "two calls, system, follow-up": [
        SYSTEM,
        user("Weather?"),
        reply("Looking.", tool_calls=(CALL, CALL)),
        result('{"temp": 20}'),
        result("a < b & c"),
        reply("Warm."),
        user("Tomorrow?"),
        reply("", tool_calls=(CALL,)),
        result("ok"),
    ],
}
WITH_TOOLS = ("qwen", "llama3", "mistral")
TRIMMING = ("llama3", "gemma")  # their Go templates trim with `range` over an integer


@pytest.fixture(scope="session")
def go(tmp_path_factory):
    """(render(template, messages_list, tools) -> Ollama's output, Go version): the renderer built once."""
    if shutil.which("go") is None:
        pytest.skip(
            "no go binary (apt-get install golang-go) to render Ollama's Go templates"
        )
    work = tmp_path_factory.mktemp("ollama-go")
    (work / "main.go").write_text(GO_RENDERER)
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GOPATH": str(work / "gopath"), "GOTOOLCHAIN": "local",
           "GOFLAGS": "", "GOPROXY": "off", "CGO_ENABLED": "0"}  # fmt: skip
    subprocess.run(
        ["go", "build", "-o", "render", "main.go"],
        cwd=work,
        env=env,
        check=True,
        timeout=600,
    )
    version = subprocess.run(
        ["go", "env", "GOVERSION"], env=env, capture_output=True, text=True, check=True
    ).stdout
    major_minor = tuple(int(x) for x in re.match(r"go(\d+)\.(\d+)", version).groups())

    def render(template: str, conversations: list, tools=()) -> dict:
        cases = [
            {"messages": [ollama_message(m) for m in msgs], "tools": list(tools)}
            for msgs in conversations
        ]
        out = subprocess.run([str(work / "render")], input=json.dumps({"template": template, "cases": cases}),
                             capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
        return json.loads(out.stdout)

    return render, major_minor


@pytest.fixture(scope="module")
def tok(smol_tok):
    return smol_tok


def ollama_message(m: Message) -> dict:
    """The message as Ollama's chat API takes it; reasoning arrives split out of the content, as Ollama's
    thinking parser leaves it for a template that declares <think> tags."""
    d = {"role": m.role, "content": m.content, "thinking": m.reasoning or ""}
    d["tool_calls"] = [{"function": c["function"]} for c in m.tool_calls]
    return d | ({"tool_name": m.name} if m.name else {})


def jinja(tok, name: str, messages, tools=(), generate: bool = True) -> str:
    """The built-in rendered as sftlab renders it, less the opening BOS that Ollama's runner adds."""
    text = ChatTemplate(tok, name).render(
        messages, add_generation_prompt=generate, tools=tools
    )
    return text.removeprefix(tok.bos_token) if "bos_token" in BUILTIN[name] else text


def texts(response: dict) -> list[str]:
    assert all("error" not in r for r in response["renders"]), response["renders"]
    return [r["text"] for r in response["renders"]]


def canonical_json(text: str) -> str:
    """`text` with each JSON value in it rewritten one way (sorted keys, no spaces), for comparing renders that
    differ only in JSON layout: Go's json writes {"a":1} where Jinja's tojson writes {"a": 1}."""
    out, i, decoder = [], 0, json.JSONDecoder()
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                pass
            else:
                out.append(
                    json.dumps(
                        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                    )
                )
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def read_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's Modelfile parser (parser/parser.go) reads them: a value ends at the first
    line end where the text so far, trimmed, is unquoted or one whole "..." or \"\"\"...\"\"\" string; no escapes;
    unprintable characters other than tabs and line ends dropped."""
    commands, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) + 1 or len(text)
            continue
        name = re.match(r"[A-Za-z]+", text[i:]).group()
        i += len(name) + 1  # the space after it
        if name.lower() == "parameter":
            param = re.match(r"[A-Za-z0-9_]+", text[i:]).group()
            name, i = f"parameter {param}", i + len(param) + 1
        buffer = ""
        while True:
            ch = text[i] if i < len(text) else "\n"
            i += 1
            if ch in "\r\n":
                value = unquote(buffer.strip())
                if value is not None:
                    break
            if ch in " \t\r\n" or ch.isprintable():
                buffer += ch
            if i > len(text):
                raise ValueError(f"unterminated value for {name}")
        commands.append((name.lower(), value))
    return commands


def unquote(s: str) -> str | None:
    if s.startswith('"""'):
        return s[3:-3] if len(s) >= 6 and s.endswith('"""') else None
    if s.startswith('"'):
        return s[1:-1] if len(s) >= 2 and s.endswith('"') else None
    return s


# --- the Modelfile ---------------------------------------------------------------------------------------------


def test_every_builtin_has_a_go_template_whose_text_is_output_as_written():
    assert TEMPLATES.keys() == BUILTIN.keys()
    for name, text in TEMPLATES.items():
        # a whitespace trim marker would eat the newlines the templates write outside {{ }}
        assert "{{-" not in text and "-}}" not in text, name
        assert text == go_template(name)


def test_a_builtin_template_gets_from_stops_system_and_its_template():
    text, note = modelfile(
        "run.Q8_0.gguf", "qwen", ["<|im_end|>", "<|endoftext|>"], "Be brief."
    )
    assert note is None
    assert text.splitlines()[:4] == ["FROM ./run.Q8_0.gguf", 'PARAMETER stop "<|im_end|>"',
                                     'PARAMETER stop "<|endoftext|>"', 'SYSTEM """Be brief."""']  # fmt: skip
    assert read_modelfile(text) == [("from", "./run.Q8_0.gguf"), ("parameter stop", "<|im_end|>"),
                                    ("parameter stop", "<|endoftext|>"), ("system", "Be brief."),
                                    ("template", TEMPLATES["qwen"])]  # fmt: skip


@pytest.mark.parametrize("name", list(BUILTIN))
def test_every_template_reads_back_whole_with_the_runs_tokens(name):
    text, _ = modelfile(
        "m.gguf",
        name,
        ["<|im_end|>"],
        None,
        bos_token="<|im_start|>",
        eos_token='<|"end"\\|>',
    )
    assert dict(read_modelfile(text))["template"] == go_template(
        name, "<|im_start|>", '<|"end"\\|>'
    )


def test_the_runs_eos_replaces_the_default_where_the_template_writes_it():
    alpaca = go_template("alpaca", eos_token="<|endoftext|>")
    assert '$eos := "<|endoftext|>"' in alpaca and "</s>" not in alpaca
    llama2 = go_template("llama2", bos_token="<|im_start|>", eos_token='a"b\\c')
    # written as Go string literals
    assert '$bos := "<|im_start|>"' in llama2 and '$eos := "a\\"b\\\\c"' in llama2
    assert go_template("chatml", "<x>", "<y>") == TEMPLATES["chatml"]  # writes neither


def test_stop_tokens_with_quotes_backslashes_and_spaces_read_back_unchanged():
    # Ollama's parser has no escapes: a quoted value is what lies between the first and last quote
    stops = [
        'a"b',
        "c\\d",
        '"quoted"',
        "### Instruction:",
        "two words",
        "<｜end▁of▁sentence｜>",
    ]
    text, _ = modelfile("m.gguf", "chatml", stops, None)
    assert [v for k, v in read_modelfile(text) if k == "parameter stop"] == stops
    assert 'PARAMETER stop "c\\d"' in text.splitlines()


def test_a_stop_token_no_quoting_holds_is_refused():
    with pytest.raises(ValueError, match="a stop token"):
        modelfile("m.gguf", "chatml", ['a"""\nb'], None)
    # a line ending in a quote would close "..." early: triple quotes carry it
    text, _ = modelfile("m.gguf", "chatml", ['say "x"\nnow'], None)
    assert dict(read_modelfile(text))["parameter stop"] == 'say "x"\nnow'
    assert text.splitlines()[1] == 'PARAMETER stop """say "x"'


@pytest.mark.parametrize("system", ['Answer in """triple quotes""" please.', 'He said "hi"\nand left "', "Line one\n\n  indented\n",
                                    'ends with a quote"', '"""starts with them'])  # fmt: skip
def test_a_system_text_with_quotes_reads_back_unchanged(system):
    text, note = modelfile("m.gguf", "chatml", [], system)
    assert note is None
    assert dict(read_modelfile(text))["system"] == system


def test_a_system_text_no_quoting_holds_is_left_out_with_a_note():
    # a line ending in """ would close the value early; neither quoting can carry it, and nothing escapes it
    text, note = modelfile("m.gguf", "chatml", ["<|im_end|>"], 'Say """\nthen stop"')
    assert "SYSTEM" not in text and 'ending in """' in note and "each request" in note
    assert dict(read_modelfile(text))["template"] == TEMPLATES["chatml"]


@pytest.mark.parametrize("spec", ["auto", "templates/custom.jinja"])
def test_auto_or_a_template_file_leaves_the_template_to_the_ggufs_own(spec):
    text, note = modelfile("m.gguf", spec, ["<|im_end|>"], None)
    assert "TEMPLATE" not in text
    assert read_modelfile(text) == [
        ("from", "./m.gguf"),
        ("parameter stop", "<|im_end|>"),
    ]
    assert spec in note and "tokenizer.chat_template" in note and "ollama show" in note


def test_create_command_quotes_what_the_shell_would_split():
    assert (
        create_command("my-model", "out/Modelfile")
        == "ollama create my-model -f out/Modelfile"
    )
    assert (
        create_command("m", "/tmp/my run/Modelfile")
        == "ollama create m -f '/tmp/my run/Modelfile'"
    )


# --- Go rendering, as Ollama renders ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN))
def test_go_renders_each_conversation_as_the_jinja_template_does(go, tok, name):
    render, version = go
    cases = {
        k: v
        for k, v in CASES.items()
        if k != "padded" or name not in TRIMMING or version >= (1, 22)
    }
    template = go_template(name, tok.bos_token, tok.eos_token)
    got = texts(render(template, list(cases.values())))
    for case, text in zip(cases, got):
        assert text == jinja(tok, name, cases[case]), case


@pytest.mark.parametrize("name", TRIMMING)
def test_trimming_templates_trim_ascii_whitespace_like_jinja(go, tok, name):
    render, version = go
    if version < (1, 22):
        pytest.skip(
            f"text/template ranges over integers from Go 1.22 (Ollama's builds use newer); this is {version}"
        )
    contents = [
        " a ",
        "\n\n",
        "x",
        "\t\x0b\x0c\r\x1c y \x1f\n",
        "你好 ",
        " ",
        "a\u00a0",
    ]
    conversations = [[user(c), reply(c), user("next")] for c in contents]
    got = texts(render(go_template(name, tok.bos_token, tok.eos_token), conversations))
    want = [jinja(tok, name, conv) for conv in conversations]
    assert got[:-1] == want[:-1]
    # a known difference: Jinja's trim also strips Unicode spaces, the Go template only ASCII whitespace
    assert got[-1] != want[-1] and got[-1].count("\u00a0") == 2


def test_deepseek_drops_the_reasoning_ollama_split_out_and_opens_think(go, tok):
    render, _ = go
    conv = [
        SYSTEM,
        user("2+2?"),
        reply("4.", reasoning="Two and two."),
        user("3+3?"),
        reply("6."),
        user("4+4?"),
    ]
    [text] = texts(render(go_template("deepseek"), [conv]))
    assert text == jinja(
        tok, "deepseek", conv
    )  # the Jinja strips the reasoning inlined in the content
    assert "Two and two" not in text and text.endswith("<｜Assistant｜><think>\n")
    assert "<｜Assistant｜>\n\n4.<｜end▁of▁sentence｜>" in text


@pytest.mark.parametrize("name", WITH_TOOLS)
def test_go_renders_tool_calls_and_results_as_the_jinja_template_up_to_json_layout(
    go, tok, name
):
    # Go's `json` writes compact JSON with <, >, & escaped and cannot write Python's {"a": 1}: values compared
    render, _ = go
    template = go_template(name, tok.bos_token, tok.eos_token)
    got = texts(render(template, list(TOOL_CASES.values()), tools=[TOOL]))
    for case, text in zip(TOOL_CASES, got):
        want = jinja(tok, name, TOOL_CASES[case], tools=[TOOL])
        assert canonical_json(text) == canonical_json(want), case
        assert "get_weather" in text and '"Paris"' in text


@pytest.mark.parametrize("name", list(BUILTIN))
def test_a_final_assistant_message_is_left_open_for_ollama_to_continue(go, tok, name):
    render, _ = go
    conversations = [
        [user("Hi"), reply("Sure, here")],
        [SYSTEM, *THREE_TURNS, reply("Sure, here")],
    ]
    for conv, text in zip(
        conversations,
        texts(render(go_template(name, tok.bos_token, tok.eos_token), conversations)),
    ):
        closed = jinja(
            tok, name, conv, generate=False
        )  # the reply with its end of turn
        assert (
            text.endswith("Sure, here") and closed.startswith(text) and closed != text
        )


@pytest.mark.parametrize(
    "name, tag",
    [("qwen", "<tool_call>"), ("llama3", "{"), ("mistral", "[TOOL_CALLS] [")],
)
def test_ollama_finds_the_text_each_template_opens_tool_calls_with(go, name, tag):
    # Ollama's tool parser watches the model's output for the first text of the template's tool-call branch
    response = go[0](TEMPLATES[name], [])
    assert response["tool_tag"].strip() == tag


def test_ollama_infers_deepseeks_think_tags_and_no_others(go):
    render, _ = go
    assert render(TEMPLATES["deepseek"], [])["think_tags"] == ["<think>", "</think>"]
    assert all(
        render(TEMPLATES[n], [])["think_tags"] == ["", ""]
        for n in BUILTIN
        if n != "deepseek"
    )


def test_the_system_of_a_modelfile_reaches_every_template_as_ollama_passes_it(go, tok):
    # Ollama puts the Modelfile's SYSTEM first in a request that has no system message
    render, _ = go
    text, _ = modelfile("m.gguf", "gemma", [], "Be brief.")
    template, system = (
        dict(read_modelfile(text))["template"],
        dict(read_modelfile(text))["system"],
    )
    [got] = texts(render(template, [[Message("system", system), user("Hi")]]))
    assert got == jinja(tok, "gemma", [SYSTEM, user("Hi")])
