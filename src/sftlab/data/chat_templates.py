"""Built-in chat templates for models that ship none (`data.template: NAME`), written here from each
family's documented prompt format. Each renders OpenAI-style messages (system, user, assistant with
optional tool_calls, tool) the way the family's own models were trained to read them.

    chatml    <|im_start|>role\\n...<|im_end|>\\n                     (SmolLM, OpenHermes; no tools)
    qwen      ChatML with tools: <tools> schemas in the system turn, <tool_call> JSON in replies,
              results as <tool_response> in a user turn (Qwen2.5 layout)
    llama2    [INST] <<SYS>>...<</SYS>> ... [/INST] reply </s>
    llama3    <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>; tool calls as JSON,
              results in the ipython role (Llama 3.1 layout)
    mistral   [INST] ... [/INST] reply</s>; the system text joins the last user turn, tools as
              [AVAILABLE_TOOLS], calls as [TOOL_CALLS], results as [TOOL_RESULTS] (Mistral v0.3 layout)
    gemma     <start_of_turn>user|model\\n...<end_of_turn>\\n; no system role: its text opens the
              first user turn (Gemma 2/3 convention)
    phi3      <|role|>\\n...<|end|>\\n, EOS after the conversation's final turn (Phi-3 layout)
    deepseek  <｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>; the generation prompt opens <think>
              and earlier replies lose their reasoning (DeepSeek-R1 distill layout)
    alpaca    ### Instruction / ### Response blocks
"""

from __future__ import annotations

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

QWEN = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\n\n' }}{%- endif -%}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools -%}{{- '\n' + (tool | tojson) }}{%- endfor -%}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{\"name\": <function-name>, \"arguments\": <args-json-object>}'
    "\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' or (message['role'] == 'assistant' and not message.tool_calls) -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] -%}{{- '\n' + message['content'] }}{%- endif -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set f = call.function if call.function is defined else call -%}"
    '{{- \'\n<tool_call>\n{"name": "\' + f.name + \'", "arguments": \' + (f.arguments | tojson) + \'}\n</tool_call>\' }}'
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' }}{%- endif -%}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Meta's Llama-2-chat layout: the system prompt folds into the first [INST] block, and the reply
# begins with the space after [/INST], so that space is generated (and trained) with the reply.
LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' }}"
    "{%- if loop.first and system is not none -%}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{%- endif -%}"
    "{{ message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'] + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

LLAMA3 = (
    "{{- bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] | trim -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- if tools -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + 'Environment: ipython\n\n"
    "You have access to the following functions. To call a function, respond with a JSON object of the form "
    '{\"name\": function name, \"parameters\": dictionary of argument names and values}.\' -%}'
    "{%- for tool in tools -%}{%- set ns.system = ns.system + '\n\n' + (tool | tojson) -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if ns.system -%}{{- '<|start_header_id|>system<|end_header_id|>\n\n' + ns.system + '<|eot_id|>' }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' and message.tool_calls -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- for call in message.tool_calls -%}"
    "{%- set f = call.function if call.function is defined else call -%}"
    '{{- \'{"name": "\' + f.name + \'", "parameters": \' + (f.arguments | tojson) + \'}\' }}'
    "{%- if not loop.last -%}{{- '\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if tools and loop.index0 == ns.last_user -%}"
    "{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif -%}"
    "{%- if loop.last and system_message is defined -%}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else -%}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls -%}"
    "{{- '[TOOL_CALLS] [' }}"
    "{%- for call in message.tool_calls -%}"
    "{%- set f = call.function if call.function is defined else call -%}"
    '{{- \'{"name": "\' + f.name + \'", "arguments": \' + (f.arguments | tojson) + \'}\' }}'
    "{%- if not loop.last -%}{{- ', ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ']' + eos_token }}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + (message['content'] | tojson) + '}[/TOOL_RESULTS]' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' }}{%- endif -%}"
)

PHI3 = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' }}{%- else -%}{{- eos_token }}{%- endif -%}"
)

DEEPSEEK = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\n' }}{%- endif -%}"
)

ALPACA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' }}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '\n\n### Instruction:\n' + message['content'] }}"
    "{%- else -%}{{ '\n\n### Response:\n' + message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\n### Response:\n' }}{%- endif -%}"
)

BUILTIN = {"chatml": CHATML, "qwen": QWEN, "llama2": LLAMA2, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA,
           "phi3": PHI3, "deepseek": DEEPSEEK, "alpaca": ALPACA}  # fmt: skip

# Special tokens that close a turn in these and the families' own templates; the tokenizer's EOS is one too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
                      "<｜end▁of▁sentence｜>")  # fmt: skip
