"""`sftlab <command>`: the user's entry point. User errors print one clear message and exit 2."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from sftlab.auth import LOOPBACK_BINDS as LOOPBACK
from sftlab.errors import ConfigError, SftlabError


def main(argv: list[str] | None = None) -> int:
    # Library progress bars for sub-second steps drown our own report; keep theirs off.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter between HF libraries
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import logging

    # bitsandbytes (imported by peft) warns at import that an optional CPU kernel package is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    # parse_known_args lets overrides come after options (`--num 2 data.max_length=512`).
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except SftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftlab", description="Supervised fine-tuning of language models.")
    sub = parser.add_subparsers(metavar="COMMAND")

    data = sub.add_parser("data", help="inspect and tokenize datasets").add_subparsers(metavar="ACTION")
    p = data.add_parser("inspect", help="print the length/truncation report and examples with the loss mask")
    _config_args(p, data_ok=True)
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--num", type=int, default=3, help="examples to show")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(run=cmd_data_inspect)

    p = data.add_parser("tokenize", help="write input_ids/labels as JSONL")
    _config_args(p, data_ok=True)
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--output", required=True, help="FILE.jsonl")
    p.set_defaults(run=cmd_data_tokenize)

    p = data.add_parser("clean", help="drop duplicates, near duplicates, bad and contaminated records (with reasons)")
    p.add_argument("inputs", nargs="+", help="data files, directories or globs (never modified)")
    p.add_argument("--output", required=True, help="directory for kept.jsonl, rejected.jsonl, report.json, manifest.json")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates")
    p.add_argument("--min-tokens", type=int, default=1, help="fewest response tokens")
    p.add_argument("--max-tokens", type=int, default=0, help="most response tokens (0: no bound)")
    p.add_argument("--model", help="count tokens with this model.name's tokenizer (default: words, CJK characters)")
    p.add_argument("--max-repeat", type=float, default=0.5, help="largest share of repeated word 3-grams")
    p.add_argument("--refusals", help="file of regular expressions (one a line) replacing the built-in refusal list")
    p.add_argument("--keep-lang", default="", help="comma-separated language codes to keep (e.g. en,zh)")
    p.add_argument("--drop-lang", default="", help="comma-separated language codes to drop")
    p.add_argument("--decontaminate", nargs="*", default=[], metavar="FILE", help="eval/benchmark files")
    p.add_argument("--ngram", type=int, default=13, help="shared n-gram length that marks contamination")
    p.add_argument("--scrub-pii", action="store_true", help="replace emails, phones, card numbers, IPs")
    p.add_argument("--screen", metavar="RUN_DIR", help="drop what this classification run flags (e.g. harmful)")
    p.add_argument("--screen-threshold", type=float, metavar="P", help="flag at this probability (default 0.5)")
    p.add_argument("--screen-label", nargs="+", action="extend", metavar="LABEL",
                   help="the labels that flag (default: all but one named safe/ok/clean/benign/none/negative/0)")
    p.set_defaults(run=cmd_data_clean)

    p = data.add_parser("split", help="deterministic train/validation/test split; near duplicates stay together")
    p.add_argument("inputs", nargs="+", help="data files, directories or globs")
    p.add_argument("--output", required=True, help="directory for one JSONL per split and manifest.json")
    p.add_argument("--ratios", default="0.9,0.05,0.05", help="comma-separated fractions summing to 1")
    p.add_argument("--names", default="train,validation,test", help="comma-separated split names")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stratify", help="a record field whose values keep their proportions in every split")
    p.add_argument("--near-threshold", type=float, default=0.8)
    p.set_defaults(run=cmd_data_split)

    p = data.add_parser("diff", help="records added, removed and changed between two clean/split manifests")
    p.add_argument("manifest_a", metavar="MANIFEST_A", help="the older manifest.json (or the directory holding it)")
    p.add_argument("manifest_b", metavar="MANIFEST_B", help="the newer one")
    p.add_argument("--output", metavar="FILE.json", help="also write the full lists of entries here")
    p.set_defaults(run=cmd_data_diff)

    p = data.add_parser("stats", help="counts, turns, token lengths, languages, duplicate rate, a histogram")
    p.add_argument("inputs", nargs="+", help="data files, directories or globs")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model.name whose tokenizer counts tokens")
    p.add_argument("--output", help="directory for stats.json and lengths.png")
    p.add_argument("--by", metavar="metadata.KEY", help="also count records and lengths per value of a metadata key")
    p.set_defaults(run=cmd_data_stats)

    p = data.add_parser("synth", help="grow seed tasks into a larger set with Self-Instruct (resumable)")
    p.add_argument("--seed-tasks", required=True, help="JSONL of {instruction, input, output} (or Self-Instruct's)")
    p.add_argument("--num", type=int, required=True, help="how many new tasks OUTPUT should hold")
    p.add_argument("--output", required=True, help="Alpaca JSONL; .rejected.jsonl and .progress.json beside it")
    p.add_argument("--model", default="smollm2-135m-instruct", help="local generator: a model.name or run dir")
    p.add_argument("--endpoint", help="OpenAI-compatible server URL instead (e.g. of `sftlab serve`)")
    p.add_argument("--endpoint-model", help="the model id to ask the endpoint for (default: its first)")
    p.add_argument("--api-key", default=os.environ.get("SFTLAB_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="endpoint key (default: $SFTLAB_API_KEY or $OPENAI_API_KEY)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts per round")
    p.add_argument("--prompt-tasks", type=int, default=3, help="in-context example tasks per prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--similarity", type=float, default=0.7, help="reject at this ROUGE-L to any pool instruction")
    p.add_argument("--min-words", type=int, default=3, help="fewest instruction words")
    p.add_argument("--max-words", type=int, default=150, help="most instruction words")
    p.add_argument("--banned", help="file of banned keywords (one a line) replacing the built-in list")
    p.add_argument("--patience", type=int, default=20, help="give up after this many rounds without a new task")
    p.set_defaults(run=cmd_data_synth)

    p = sub.add_parser("train", help="fine-tune a model (full or LoRA)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in train.output_dir")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("generate", help="answer prompts with a trained run (or any model)")
    p.add_argument("source", help="run directory, exported model directory, or a model.name")
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    p.add_argument("--prompts", help="JSONL of {prompt} or {messages} per line")
    p.add_argument("--system", help="system message for every prompt")
    p.add_argument("--base", action="store_true", help="also answer with the base model, side by side")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="also write {messages, response[, base_response]} JSONL here")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("predict", help="classify texts with a classification run")
    p.add_argument("run_dir")
    p.add_argument("--input", required=True, help="JSONL/JSON/CSV/Parquet of {text[, text_pair]}, or a .txt (one a line)")
    p.add_argument("--output", required=True, help="JSONL: one {label, probs} per input record")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("translate", help="translate sources with a seq2seq run")
    p.add_argument("run_dir")
    p.add_argument("--input", required=True, help="JSONL/JSON/CSV/Parquet of {source}, or a .txt (one a line)")
    p.add_argument("--output", help="JSONL of {source, translation} (default: print the translations)")
    p.add_argument("--num-beams", type=int, help="beam width (default: the run's seq2seq.num_beams)")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's seq2seq.max_target_length")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(run=cmd_translate)

    p = sub.add_parser("eval", help="loss, generation metrics and benchmark tasks; --compare against the base")
    p.add_argument("config", help="run directory, or a YAML config (model + data.eval and/or eval.tasks)")
    # extend, not store: an override that --compare took (CompareAction) may be parsed before the positionals
    p.add_argument("overrides", nargs="*", action="extend", metavar="key.sub=value",
                   help="config overrides (eval.*, data.*)")
    p.add_argument("--output", help="directory for metrics.json and samples.jsonl (default: the run's eval/)")
    p.add_argument("--compare", nargs="?", const="base", metavar="BASE", action=CompareAction,
                   help="also evaluate BASE (default: the run's base model) and print deltas")
    p.add_argument("--precision", choices=["as-trained", "fp32"], default="as-trained",
                   help="as-trained (default): the run's precision path and attention kernel, so eval loss "
                        "matches training's; fp32: both models in fp32")  # fmt: skip
    p.add_argument("--judge", metavar="ENDPOINT",
                   help="an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1; `sftlab serve` too) that grades "
                        "the answers 1-10 and, with --compare, judges base vs tuned in both orders")  # fmt: skip
    p.add_argument("--judge-model", metavar="ID", help="the judge's model id (default: the first the endpoint lists)")
    p.add_argument("--harness", metavar="TASK[,TASK...]",
                   help="lm-evaluation-harness tasks (or groups) run in process on the model (and the base)")  # fmt: skip
    p.add_argument("--num-fewshot", type=int, metavar="N", help="--harness: few-shot examples (default: each task's)")
    p.add_argument("--limit", type=int, metavar="N", help="--harness: only the first N documents of each task")
    p.add_argument("--include-path", metavar="DIR", help="--harness: a folder of your own lm-eval YAML tasks")
    p.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=False,
                   help="--harness: render the prompts with the run's chat template (default: off, as lm-eval)")  # fmt: skip
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("report", help="one self-contained HTML page: curves, data report, metrics, samples")
    p.add_argument("run_dir")
    p.add_argument("--output", help="HTML file (default: RUN_DIR/report.html)")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("chat", help="talk to a run (or any model) in the terminal, replies streamed")
    p.add_argument("source", help="run directory, exported model directory, or a model.name")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible API (chat/completions, completions, models)")
    p.add_argument("source", help="run directory, exported model directory, or a model.name")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]RUN_DIR",
                   help="another LoRA run on the same base, served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (anything but loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="required bearer key (default: $SFTLAB_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=128, help="waiting requests before 503")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get at shutdown")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights and compute (auto: bf16/fp16 on a GPU, fp32 on CPU where it decodes as fast)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (413 above)")
    p.add_argument("--max-connections", type=int, default=256, help="open connections before 503")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send its headers")
    p.add_argument("--max-stop", type=int, default=4, help="stop strings per request")
    p.add_argument("--max-stop-chars", type=int, default=256, help="characters per stop string")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the key)")
    p.add_argument("--tool-call-parser", default="auto", choices=["auto", "none", "hermes", "llama3_json", "mistral"],
                   help="how replies' tool calls are read (auto: from the chat template)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("ui", help="web app: live runs dashboard and blind side-by-side human rating")
    p.add_argument("runs_dir", help="directory whose subdirectories are runs (e.g. runs/)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (anything but loopback requires a token)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", help="required on every request (default: $SFTLAB_UI_TOKEN; one is generated "
                                   "when binding beyond loopback without it)")  # fmt: skip
    p.add_argument("--db", help="ratings database (default: RUNS_DIR/ratings.sqlite)")
    p.add_argument("--compare", action="append", default=[], metavar="FILE",
                   help="another comparison file to rate (JSONL: prompt, answer_a, answer_b); repeatable")
    p.add_argument("--gold", action="append", default=[], metavar="FILE",
                   help="gold questions (JSONL: prompt, good, bad) mixed into every study; repeatable")
    p.set_defaults(run=cmd_ui)

    p = sub.add_parser("plan", help="estimate peak training memory and propose a batch setting that fits")
    _config_args(p)
    p.add_argument("--memory", help="budget, e.g. 24GiB (default: this machine's available memory or GPU memory)")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("merge", help="fold a LoRA run into a full Hugging Face model")
    p.add_argument("run_dir")
    p.add_argument("--output", required=True, help="directory for the merged model")
    p.add_argument("--into", choices=["nf4", "full-precision"], default=None,
                   help="qlora runs: fold into the dequantized NF4 weights it trained on (default) or the "
                        "original full-precision base")  # fmt: skip
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("export", help="the tuned model for llama.cpp/Ollama (GGUF) or vLLM (merged 16-bit), "
                                      "checked against the run before it is kept")  # fmt: skip
    p.add_argument("run_dir", help="a finished run, or one of its checkpoints (RUN/checkpoints/step-N, sharded too)")
    p.add_argument("--format", choices=["gguf", "ollama", "hf"], default="gguf",
                   help="gguf: one GGUF file; ollama: GGUF + Modelfile; hf: merged Hugging Face model (vLLM)")
    p.add_argument("--quant", help="gguf/ollama: f32|f16|bf16|q8_0|q4_k_m|q5_k_m|q6_k|... (default q8_0); "
                                   "hf: bf16|f16|f32 (default bf16), or int8|nf4 (bitsandbytes)")  # fmt: skip
    p.add_argument("--adapter-only", action="store_true",
                   help="gguf/ollama: the base's GGUF plus the LoRA as a GGUF adapter (llama.cpp --lora, Ollama ADAPTER)")
    p.add_argument("--output", required=True, help="directory to write into")
    p.add_argument("--prompts", help="JSONL prompts to check the export on (default: six built-in prompts)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of each checked greedy answer")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("config", help="print the resolved config, or every key with its help")
    p.add_argument("config", nargs="?", help="run YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--keys", action="store_true", help="list every config key, its default and meaning")
    p.set_defaults(run=cmd_config)
    return parser


def _config_args(p: argparse.ArgumentParser, data_ok: bool = False) -> None:
    p.add_argument("config", help="run YAML file" + (", or a data file/directory/glob" if data_ok else ""))
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=")  # key.sub=value: no model name or path starts like this


class CompareAction(argparse.Action):
    """`--compare [BASE]`. Its optional value would swallow an override that follows it
    (`--compare data.eval=[x]`): such a value is an override, and the comparison is against the base."""

    def __call__(self, parser, namespace, values, option_string=None):
        if OVERRIDE.match(values):
            namespace.overrides = [*(getattr(namespace, "overrides", None) or []), values]
            values = self.const
        setattr(namespace, self.dest, values)


def cmd_data_inspect(args) -> int:
    from sftlab.data.inspect import load_for_inspection, report_console, show_split
    from sftlab.model.load import load_tokenizer

    console = report_console(args.color)
    _, tok, split = load_for_inspection(args.config, args.overrides, args.split, load_tokenizer)
    show_split(console, split, tok, args.split, args.num, color=console.is_terminal and args.color != "never")
    return 0


def cmd_data_tokenize(args) -> int:
    from sftlab.data.inspect import load_for_inspection, write_tokenized
    from sftlab.model.load import load_tokenizer

    out = Path(args.output)
    _, _, split = load_for_inspection(args.config, args.overrides, args.split, load_tokenizer)
    kept, report = write_tokenized(split, out)
    print(f"wrote {kept} examples to {out} (report: {report})")
    return 0


def cmd_data_clean(args) -> int:
    from sftlab.curate.quality import CleanSettings, run_clean
    from sftlab.errors import ConfigError

    settings = CleanSettings(near_threshold=args.near_threshold, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                             max_repeat=args.max_repeat, decontam_ngram=args.ngram, scrub_pii=args.scrub_pii,
                             keep_languages=tuple(x for x in args.keep_lang.split(",") if x),
                             drop_languages=tuple(x for x in args.drop_lang.split(",") if x))  # fmt: skip
    if args.model:
        from sftlab.config import ModelConfig
        from sftlab.model.load import load_tokenizer

        settings.tokenizer = load_tokenizer(ModelConfig(name=args.model))
    if not 0 < settings.near_threshold <= 1:
        raise ConfigError("--near-threshold must be in (0, 1]")
    if args.refusals:
        settings.refusals = _read_lines("--refusals", args.refusals)
    settings.screen = _clean_screen(args)
    run_clean(args.inputs, args.output, settings, args.decontaminate)
    return 0


def _clean_screen(args):
    """`data clean --screen`: the classifier, loaded after the cheap checks; options without it are refused."""
    from sftlab.errors import ConfigError

    if not args.screen:
        given = [o for o, v in (("--screen-threshold", args.screen_threshold), ("--screen-label", args.screen_label))
                 if v is not None]  # fmt: skip
        if given:
            raise ConfigError(f"{', '.join(given)}: needs --screen RUN_DIR (a classification run)")
        return None
    threshold = 0.5 if args.screen_threshold is None else args.screen_threshold
    if not 0 < threshold <= 1:
        raise ConfigError(f"--screen-threshold {threshold}: must be in (0, 1]")
    from sftlab.curate.screen import Screen

    return Screen.load(args.screen, threshold, args.screen_label)


def cmd_data_synth(args) -> int:
    from sftlab.curate.generators import EndpointGenerator, LocalGenerator
    from sftlab.curate.synth import SynthSettings, load_seed_tasks, run_synth
    from sftlab.errors import ConfigError

    settings = SynthSettings(num=args.num, seed=args.seed, batch=args.batch, prompt_tasks=args.prompt_tasks,
                             temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                             similarity=args.similarity, min_words=args.min_words, max_words=args.max_words,
                             patience=args.patience)  # fmt: skip
    for name in ("num", "batch", "prompt_tasks", "max_new_tokens", "patience"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < settings.similarity <= 1:
        raise ConfigError("--similarity must be in (0, 1]")
    if args.banned:
        settings.banned = _read_lines("--banned", args.banned)
    load_seed_tasks(args.seed_tasks)  # a bad seed file fails before a model is loaded
    generator = (EndpointGenerator(args.endpoint, args.endpoint_model, args.api_key) if args.endpoint
                 else LocalGenerator(args.model))  # fmt: skip
    return run_synth(args.seed_tasks, args.output, settings, generator)


def _read_lines(option: str, path: str) -> tuple[str, ...]:
    """The non-blank lines of a list file given to `option`, stripped."""
    from sftlab.errors import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"{option}: {path} not found")
    return tuple(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def cmd_predict(args) -> int:
    from sftlab.task.classification import predict_file

    count = predict_file(args.run_dir, args.input, args.output, args.batch_size)
    print(f"wrote {count} predictions to {args.output}")
    return 0


def cmd_translate(args) -> int:
    from sftlab.task.seq2seq import translate_file

    hyps = translate_file(args.run_dir, args.input, args.output, args.num_beams, args.max_new_tokens, args.batch_size)
    print(f"wrote {len(hyps)} translations to {args.output}" if args.output else "\n".join(hyps))
    return 0


def cmd_data_split(args) -> int:
    from sftlab.curate.split import run_split
    from sftlab.errors import ConfigError

    try:
        ratios = [float(x) for x in args.ratios.split(",")]
    except ValueError:
        raise ConfigError(f"--ratios {args.ratios!r}: expected numbers like 0.9,0.05,0.05") from None
    run_split(args.inputs, args.output, ratios, args.names.split(","), args.seed, args.stratify, args.near_threshold)
    return 0


def cmd_data_diff(args) -> int:
    from sftlab.curate.versions import run_diff

    run_diff(args.manifest_a, args.manifest_b, args.output)
    return 0


def cmd_data_stats(args) -> int:
    from sftlab.config import ModelConfig
    from sftlab.curate.split import run_stats
    from sftlab.model.load import load_tokenizer

    run_stats(args.inputs, load_tokenizer(ModelConfig(name=args.model)), args.output, by=args.by)
    return 0


def cmd_train(args) -> int:
    from sftlab.config import load_config
    from sftlab.loop.train import train

    summary = train(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    return 130 if summary.get("outcome") == "interrupted" else 0


def cmd_generate(args) -> int:
    from sftlab.generate import Sampling, answer_prompts, gather_conversations
    from sftlab.rundir import load_run

    conversations, expected = gather_conversations(args.prompt, args.prompts, args.system)  # fails before loading
    models = {"response": load_run(args.source)}
    if args.base:
        models["base_response"] = load_run(models["response"].base_name)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    answer_prompts(models, conversations, sampling, args.output, expected=expected)
    return 0


def cmd_eval(args) -> int:
    from sftlab.evaluate.runner import run_eval

    harness = None
    if args.harness is not None:
        from sftlab.evaluate.harness import HarnessSpec

        harness = HarnessSpec([t.strip() for t in args.harness.split(",") if t.strip()], args.num_fewshot, args.limit,
                              args.include_path, args.apply_chat_template)  # fmt: skip
    elif any(v not in (None, False) for v in (args.num_fewshot, args.limit, args.include_path, args.apply_chat_template)):
        raise ConfigError("--num-fewshot, --limit, --include-path and --apply-chat-template set up --harness; "
                          "name its tasks with --harness TASK[,TASK...]")  # fmt: skip
    run_eval(args.config, args.overrides, args.output, args.compare, precision=args.precision, judge=args.judge,
             judge_model=args.judge_model, harness=harness)  # fmt: skip
    return 0


def cmd_report(args) -> int:
    from sftlab.evaluate.report import write_report

    path = write_report(args.run_dir, args.output)
    print(f"wrote {path}")
    return 0


def cmd_chat(args) -> int:
    from sftlab.rundir import load_run
    from sftlab.serve.chat import chat_loop

    loaded = load_run(args.source)
    chat_loop(loaded, args.system, args.max_new_tokens, args.temperature, args.top_p)
    return 0


def cmd_serve(args) -> int:
    from sftlab.errors import ConfigError

    api_key = args.api_key or os.environ.get("SFTLAB_API_KEY") or None
    if args.host not in LOOPBACK and not api_key:
        raise ConfigError(f"--host {args.host} exposes the server beyond this machine: set --api-key KEY "
                          "(or SFTLAB_API_KEY), or bind 127.0.0.1")  # fmt: skip
    from sftlab.serve import guard
    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import Limits, create_app
    from sftlab.serve.engine import Engine

    served = load_served(args.source, args.adapter, args.precision)
    engine = Engine(served, max_batch=args.max_batch, max_queue=args.max_queue)
    limits = Limits(max_tokens=args.max_tokens, max_stop=args.max_stop, max_stop_chars=args.max_stop_chars)
    app = create_app(engine, limits, api_key, args.grace, docs=args.docs, tool_parser=args.tool_call_parser)
    edge = guard.HttpLimits(args.max_body_bytes, args.max_connections, args.header_timeout)
    print(f"serving {', '.join(served.ids)} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)  # fmt: skip
    guard.run(guard.guarded(app, edge, loopback_keyless=api_key is None), args.host, args.port, edge, args.grace)
    return 0


def cmd_ui(args) -> int:
    import secrets

    from sftlab.errors import ConfigError
    from sftlab.ui.app import Settings, create_app
    from sftlab.ui.studies import load_comparisons, load_gold

    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        raise ConfigError(f"{runs_dir}: no such directory (give the directory your runs are written to, e.g. runs/)")
    token = args.token or os.environ.get("SFTLAB_UI_TOKEN") or None
    if args.host not in LOOPBACK and not token:
        token = secrets.token_urlsafe(24)  # reachable from other machines: never without a token
    compare = [Path(f) for f in args.compare]
    for path in compare:
        load_comparisons(path)  # a bad file given by hand stops here, with its file and line
    gold = [pair for f in args.gold for pair in load_gold(Path(f))]
    db = Path(args.db) if args.db else runs_dir / "ratings.sqlite"
    app = create_app(Settings(runs_dir, db, compare, gold, token))
    import socket

    import uvicorn

    shown = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    print(f"sftlab ui on http://{shown}:{args.port}/{'?token=' + token if token else ''}  (ratings in {db})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_plan(args) -> int:
    from sftlab.config import load_config
    from sftlab.errors import ConfigError
    from sftlab.plan import available_memory, parse_size, print_plan

    cfg = load_config(args.config, args.overrides)
    try:
        budget = parse_size(args.memory) if args.memory else available_memory()
    except ValueError as e:
        raise ConfigError(f"--memory: {e}") from None
    return 0 if print_plan(cfg, budget) else 1


def cmd_merge(args) -> int:
    from sftlab.export.merge import merge

    diff = merge(args.run_dir, args.output, into=args.into)
    print(f"merged {args.run_dir} into {args.output}; reloaded export matches the adapter (max logit diff {diff:.2e})")
    return 0


def cmd_export(args) -> int:
    import tempfile

    from sftlab.loop.materialize import is_checkpoint, materialize

    if not is_checkpoint(Path(args.run_dir)):
        return _export(args)
    with tempfile.TemporaryDirectory(prefix="sftlab-checkpoint-") as tmp:  # a stopped run's checkpoint
        print(f"exporting checkpoint {args.run_dir} (written as its run's model first)")
        args.run_dir = str(materialize(Path(args.run_dir), Path(tmp) / "model"))
        return _export(args)


def _export(args) -> int:
    from sftlab.errors import ConfigError
    from sftlab.generate import read_prompts

    prompts = read_prompts(args.prompts)[0] if args.prompts else None
    if args.format == "hf":
        from sftlab.export.hf import export_hf

        if args.adapter_only:
            raise ConfigError("--adapter-only: the run directory is the adapter vLLM loads; use --format hf without it")
        result = export_hf(args.run_dir, args.output, args.quant or "bf16", prompts, args.max_new_tokens)
        print(f"wrote {result.path} ({result.dtype}, {result.size_bytes / 2**20:.0f} MiB)")
        if result.eval_loss.get(result.dtype) is not None:
            before, after = result.eval_loss["unquantized"], result.eval_loss[result.dtype]
            print(f"eval loss {after:.4f} ({result.dtype}) against {before:.4f} unquantized ({after - before:+.4f})")
    else:
        from sftlab.export.gguf import export_gguf

        result = export_gguf(args.run_dir, args.output, args.quant or "q8_0", prompts, args.adapter_only,
                             args.format == "ollama", args.max_new_tokens)  # fmt: skip
        written = [result.path, result.adapter, result.modelfile]
        print("wrote " + ", ".join(str(p) for p in written if p) + f" ({result.size_bytes / 2**20:.0f} MiB GGUF)")
    for note in result.notes:
        print(f"note: {note}")
    for command in result.commands:
        print(f"  {command}")
    return 0


def cmd_config(args) -> int:
    from sftlab.config import describe, load_config

    if args.keys:
        for key, default, help_text in describe():
            print(f"{key:28} {default:24} {help_text}")
        return 0
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0
