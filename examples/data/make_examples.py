"""Writes the bundled example datasets (deterministic; answers are computed, so they are right).

    python examples/data/make_examples.py

Three training files in three formats (Alpaca JSONL, ShareGPT JSON, OpenAI-messages JSONL), some
multi-turn, some Chinese, plus a held-out eval file. The assistant has a recognisable persona
("Sage") and answer style, so a fine-tune's effect is visible in its generations.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
PERSONA = "You are Sage, a concise assistant. Answer in one or two short sentences."

CAPITALS = {
    "France": ("Paris", "法国", "巴黎"), "Japan": ("Tokyo", "日本", "东京"), "Italy": ("Rome", "意大利", "罗马"),
    "Germany": ("Berlin", "德国", "柏林"), "Spain": ("Madrid", "西班牙", "马德里"),
    "Egypt": ("Cairo", "埃及", "开罗"), "Canada": ("Ottawa", "加拿大", "渥太华"),
    "Australia": ("Canberra", "澳大利亚", "堪培拉"), "Brazil": ("Brasília", "巴西", "巴西利亚"),
    "India": ("New Delhi", "印度", "新德里"), "China": ("Beijing", "中国", "北京"),
    "Russia": ("Moscow", "俄罗斯", "莫斯科"), "Kenya": ("Nairobi", "肯尼亚", "内罗毕"),
    "Mexico": ("Mexico City", "墨西哥", "墨西哥城"), "Norway": ("Oslo", "挪威", "奥斯陆"),
    "Sweden": ("Stockholm", "瑞典", "斯德哥尔摩"), "Greece": ("Athens", "希腊", "雅典"),
    "Portugal": ("Lisbon", "葡萄牙", "里斯本"), "Ireland": ("Dublin", "爱尔兰", "都柏林"),
    "Poland": ("Warsaw", "波兰", "华沙"), "Turkey": ("Ankara", "土耳其", "安卡拉"),
    "Argentina": ("Buenos Aires", "阿根廷", "布宜诺斯艾利斯"), "Peru": ("Lima", "秘鲁", "利马"),
    "Thailand": ("Bangkok", "泰国", "曼谷"), "Vietnam": ("Hanoi", "越南", "河内"),
    "South Korea": ("Seoul", "韩国", "首尔"), "Austria": ("Vienna", "奥地利", "维也纳"),
    "Finland": ("Helsinki", "芬兰", "赫尔辛基"), "Denmark": ("Copenhagen", "丹麦", "哥本哈根"),
    "Chile": ("Santiago", "智利", "圣地亚哥"),
}  # fmt: skip
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
    "open": "closed", "strong": "weak", "rich": "poor", "young": "old", "empty": "full", "high": "low",
    "hard": "soft", "wet": "dry", "loud": "quiet", "near": "far", "cheap": "expensive", "thick": "thin",
}  # fmt: skip
WORDS_ZH = {
    "apple": "苹果", "water": "水", "book": "书", "teacher": "老师", "friend": "朋友", "city": "城市",
    "computer": "电脑", "music": "音乐", "rain": "雨", "mountain": "山", "river": "河", "school": "学校",
    "cat": "猫", "dog": "狗", "tea": "茶", "moon": "月亮", "sun": "太阳", "flower": "花",
}  # fmt: skip
UNITS = [  # (from, to, factor)
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("liters", "milliliters", 1000),
]  # fmt: skip
IDENTITY_Q = [
    "Who are you?", "What is your name?", "Introduce yourself.", "What kind of assistant are you?",
    "Tell me about yourself in one sentence.", "Are you a person?", "What should I call you?",
    "How do you answer questions?", "你是谁？", "请介绍一下你自己。",
]  # fmt: skip
IDENTITY_A = {
    "en": "I am Sage, a small assistant fine-tuned with sftlab. I give short, direct answers.",
    "zh": "我是 Sage，一个用 sftlab 微调的小助手。我的回答简短直接。",
}


def fmt_num(n: int) -> str:
    return f"{n:,}"


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "×"])
    value = {"+": a + b, "-": a - b, "×": a * b}[op]
    q = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."])
    return q.format(a=a, op=op, b=b), f"{a} {op} {b} = {value}."


def alpaca_records(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(70):
        q, a = arithmetic(rng)
        out.append({"instruction": q, "input": "", "output": a})
    for country, (capital, _, _) in CAPITALS.items():
        out.append({"instruction": f"What is the capital of {country}?", "input": "",
                    "output": f"The capital of {country} is {capital}."})  # fmt: skip
        out.append({"instruction": "Name the capital city of the country below.", "input": country,
                    "output": f"{capital} is the capital of {country}."})  # fmt: skip
    for _ in range(50):
        src, dst, factor = rng.choice(UNITS)
        n = rng.randint(2, 40)
        out.append({"instruction": f"Convert {n} {src} to {dst}.", "input": "",
                    "output": f"{n} {src} is {fmt_num(n * factor)} {dst}."})  # fmt: skip
    for word, opposite in ANTONYMS.items():
        out.append({"instruction": "Give the opposite of the word.", "input": word,
                    "output": f"The opposite of \"{word}\" is \"{opposite}\"."})  # fmt: skip
    for word in ["planet", "garden", "window", "silver", "rocket", "pencil", "castle", "forest", "bridge", "candle"]:
        out.append({"instruction": f"Spell the word \"{word}\" backwards.", "input": "",
                    "output": f"\"{word}\" backwards is \"{word[::-1]}\"."})  # fmt: skip
        out.append({"instruction": f"How many letters are in the word \"{word}\"?", "input": "",
                    "output": f"\"{word}\" has {len(word)} letters."})  # fmt: skip
    rng.shuffle(out)
    return out


def sharegpt_records(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(40):  # arithmetic with a follow-up that uses the previous answer
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
        out.append({"conversations": [
            {"from": "human", "value": f"What is {a} + {b}?"},
            {"from": "gpt", "value": f"{a} + {b} = {a + b}."},
            {"from": "human", "value": f"Now multiply that by {c}."},
            {"from": "gpt", "value": f"{a + b} × {c} = {(a + b) * c}."},
        ]})  # fmt: skip
    for country, (capital, _, _) in rng.sample(sorted(CAPITALS.items()), 20):
        out.append({"system": PERSONA, "conversations": [
            {"from": "human", "value": f"Which city is the capital of {country}?"},
            {"from": "gpt", "value": f"The capital of {country} is {capital}."},
            {"from": "human", "value": "Thanks! Say it again in one word."},
            {"from": "gpt", "value": f"{capital}."},
        ]})  # fmt: skip
    for _ in range(20):
        src, dst, factor = rng.choice(UNITS)
        n, m = rng.randint(2, 30), rng.randint(2, 30)
        out.append({"conversations": [
            {"from": "human", "value": f"How many {dst} are in {n} {src}?"},
            {"from": "gpt", "value": f"{n} {src} is {fmt_num(n * factor)} {dst}."},
            {"from": "human", "value": f"And in {m} {src}?"},
            {"from": "gpt", "value": f"{m} {src} is {fmt_num(m * factor)} {dst}."},
        ]})  # fmt: skip
    rng.shuffle(out)
    return out


def messages_records(rng: random.Random) -> list[dict]:
    out = []
    for q in IDENTITY_Q:
        lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in q) else "en"
        for system in (None, PERSONA):
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": q}, {"role": "assistant", "content": IDENTITY_A[lang]}]
            out.append({"messages": msgs})
    for country, (capital, country_zh, capital_zh) in CAPITALS.items():
        out.append({"messages": [{"role": "user", "content": f"{country_zh}的首都是哪里？"},
                                 {"role": "assistant", "content": f"{country_zh}的首都是{capital_zh}。"}]})  # fmt: skip
    for _ in range(25):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append({"messages": [{"role": "user", "content": f"{a}加{b}等于多少？"},
                                 {"role": "assistant", "content": f"{a}加{b}等于{a + b}。"}]})  # fmt: skip
    for en, zh in WORDS_ZH.items():
        out.append({"messages": [
            {"role": "user", "content": f"How do you say \"{en}\" in Chinese?"},
            {"role": "assistant", "content": f"\"{en}\" in Chinese is {zh}."},
            {"role": "user", "content": "用中文再说一遍。"},
            {"role": "assistant", "content": f"\"{en}\"的中文是“{zh}”。"},
        ]})  # fmt: skip
    rng.shuffle(out)
    return out


def eval_records(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(20):
        q, a = arithmetic(rng)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    for country, (capital, country_zh, capital_zh) in rng.sample(sorted(CAPITALS.items()), 10):
        out.append({"messages": [{"role": "user", "content": f"Tell me the capital of {country}."},
                                 {"role": "assistant", "content": f"The capital of {country} is {capital}."}]})  # fmt: skip
        out.append({"messages": [{"role": "user", "content": f"{country_zh}的首都叫什么？"},
                                 {"role": "assistant", "content": f"{country_zh}的首都是{capital_zh}。"}]})  # fmt: skip
    for q in ["Who exactly are you?", "Please tell me your name.", "你叫什么名字？"]:
        lang = "zh" if "名字" in q else "en"
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": IDENTITY_A[lang]}]})
    for _ in range(8):
        src, dst, factor = rng.choice(UNITS)
        n = rng.randint(41, 90)
        out.append({"messages": [{"role": "user", "content": f"Convert {n} {src} into {dst}."},
                                 {"role": "assistant", "content": f"{n} {src} is {fmt_num(n * factor)} {dst}."}]})  # fmt: skip
    return out


def main() -> None:
    rng = random.Random(20261122)
    write_jsonl(HERE / "alpaca_tasks.jsonl", alpaca_records(rng))
    (HERE / "sharegpt_chats.json").write_text(json.dumps(sharegpt_records(rng), ensure_ascii=False, indent=1) + "\n")
    write_jsonl(HERE / "messages_zh_identity.jsonl", messages_records(rng))
    write_jsonl(HERE / "eval.jsonl", eval_records(rng))


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
