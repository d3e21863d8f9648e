"""Blind side-by-side ratings in SQLite.

WAL mode with synchronous=FULL: every rating is committed to disk before its request is answered, so a
killed server loses none, and readers never block the writer. Each rating is one INSERT under
UNIQUE(item, annotator), so two annotators never touch each other's rows and a double submit is refused.

Blinding: an annotator's order of items and the side each model's answer appears on are drawn once
(seeded by study and annotator) and kept server-side; the page only ever sees "left" and "right".
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DIMENSIONS = ("helpfulness", "accuracy", "fluency", "harmlessness")
SIDES = ("a", "b")
SCORE_COLUMNS = [f"{d}_{s}" for s in SIDES for d in DIMENSIONS]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS studies(
  id TEXT PRIMARY KEY, name TEXT NOT NULL, source TEXT NOT NULL, model_a TEXT NOT NULL, model_b TEXT NOT NULL,
  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items(
  id INTEGER PRIMARY KEY, study TEXT NOT NULL REFERENCES studies(id), position INTEGER NOT NULL,
  prompt TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL, reference TEXT,
  gold TEXT CHECK (gold IN ('a', 'b', 'tie')), UNIQUE(study, position));
CREATE TABLE IF NOT EXISTS assignments(
  study TEXT NOT NULL, annotator TEXT NOT NULL, item INTEGER NOT NULL REFERENCES items(id), position INTEGER NOT NULL,
  left_is_a INTEGER NOT NULL, PRIMARY KEY(study, annotator, item));
CREATE TABLE IF NOT EXISTS ratings(
  id INTEGER PRIMARY KEY, study TEXT NOT NULL, item INTEGER NOT NULL REFERENCES items(id), annotator TEXT NOT NULL,
  preference TEXT NOT NULL CHECK (preference IN ('a', 'b', 'tie')), left_is_a INTEGER NOT NULL,
  {", ".join(f"{c} INTEGER NOT NULL CHECK ({c} BETWEEN 1 AND 5)" for c in SCORE_COLUMNS)},
  seconds REAL, created REAL NOT NULL, UNIQUE(item, annotator));
"""


class UiError(Exception):
    """A request the app cannot take; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Pair:
    """One comparison: a prompt and two answers; gold is the known right preference ('a'/'b'/'tie') or None."""

    prompt: str
    answer_a: str
    answer_b: str
    reference: str | None = None
    gold: str | None = None


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def connect(self):
        # One connection per use: sqlite3 connections must not cross threads, and FastAPI runs
        # handlers on a pool. isolation_level=None: transactions are opened explicitly below.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        try:
            yield db
        finally:
            db.close()

    def add_study(self, name: str, source: str, model_a: str, model_b: str, pairs: list[Pair]) -> str:
        """The study's id; adding the same pairs again returns the existing study (ratings kept)."""
        digest = hashlib.sha256(json.dumps([source, model_a, model_b, [vars(p) for p in pairs]],
                                           ensure_ascii=False).encode()).hexdigest()  # fmt: skip
        study = f"{slug(name)}-{digest[:8]}"
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT 1 FROM studies WHERE id = ?", (study,)).fetchone() is None:
                db.execute("INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?)", (study, name, source, model_a, model_b,
                                                                             time.time()))  # fmt: skip
                db.executemany("INSERT INTO items(study, position, prompt, answer_a, answer_b, reference, gold) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(study, i, p.prompt, p.answer_a, p.answer_b, p.reference, p.gold)
                                for i, p in enumerate(pairs)])  # fmt: skip
            db.execute("COMMIT")
        return study

    def studies(self, only: str | None = None) -> list[dict]:
        """Every study (or the one with id `only`) with its item, rating and annotator counts."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM items i WHERE i.study = s.id AND i.gold IS NULL) AS items, "
                "(SELECT COUNT(*) FROM items i WHERE i.study = s.id AND i.gold IS NOT NULL) AS gold_items, "
                "(SELECT COUNT(*) FROM ratings r WHERE r.study = s.id) AS ratings, "
                "(SELECT COUNT(DISTINCT annotator) FROM ratings r WHERE r.study = s.id) AS annotators "
                "FROM studies s WHERE ? IS NULL OR s.id = ? ORDER BY s.created", (only, only)).fetchall()  # fmt: skip
        return [dict(r) for r in rows]

    def study(self, study: str) -> dict:
        found = self.studies(only=study)
        if not found:
            raise UiError(404, f"no study {study!r}; the dashboard lists the studies")
        return found[0]

    def next_item(self, study: str, annotator: str) -> dict:
        """The annotator's next unrated item as {item, prompt, left, right} (or done), with progress."""
        self.study(study)
        self._assign(study, annotator)
        with self.connect() as db:
            row = db.execute(
                "SELECT a.item, a.left_is_a, i.prompt, i.answer_a, i.answer_b FROM assignments a "
                "JOIN items i ON i.id = a.item WHERE a.study = ? AND a.annotator = ? AND NOT EXISTS "
                "(SELECT 1 FROM ratings r WHERE r.item = a.item AND r.annotator = a.annotator) "
                "ORDER BY a.position LIMIT 1", (study, annotator)).fetchone()  # fmt: skip
            done, total = db.execute(
                "SELECT (SELECT COUNT(*) FROM ratings WHERE study = ? AND annotator = ?), "
                "(SELECT COUNT(*) FROM assignments WHERE study = ? AND annotator = ?)",
                (study, annotator, study, annotator)).fetchone()  # fmt: skip
        progress = {"done": done, "total": total}
        if row is None:
            return {"done": True, "progress": progress}
        left, right = (row["answer_a"], row["answer_b"]) if row["left_is_a"] else (row["answer_b"], row["answer_a"])
        return {"done": False, "item": row["item"], "prompt": row["prompt"], "left": left, "right": right,
                "progress": progress}  # fmt: skip

    def _assign(self, study: str, annotator: str) -> None:
        with self.connect() as db:
            if db.execute("SELECT 1 FROM assignments WHERE study = ? AND annotator = ? LIMIT 1",
                          (study, annotator)).fetchone():  # fmt: skip
                return
            items = [r[0] for r in db.execute("SELECT id FROM items WHERE study = ? ORDER BY position", (study,))]
            rng = random.Random(hashlib.sha256(f"{study}\0{annotator}".encode()).digest())
            rng.shuffle(items)
            rows = [(study, annotator, item, pos, rng.random() < 0.5) for pos, item in enumerate(items)]
            db.execute("BEGIN IMMEDIATE")
            # OR IGNORE: two first requests of one annotator draw the same order; the second adds nothing.
            db.executemany("INSERT OR IGNORE INTO assignments VALUES (?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")

    def rate(self, study: str, annotator: str, item: int, preference: str, scores: dict[str, dict[str, int]],
             seconds: float | None = None) -> None:  # fmt: skip
        """Record a rating given in screen terms (preference left/right/tie, scores by side)."""
        with self.connect() as db:
            row = db.execute("SELECT left_is_a FROM assignments WHERE study = ? AND annotator = ? AND item = ?",
                             (study, annotator, item)).fetchone()  # fmt: skip
            if row is None:
                raise UiError(400, f"item {item} is not in {annotator!r}'s queue for study {study!r}")
            side = {"left": "a" if row[0] else "b", "right": "b" if row[0] else "a"}
            values = {f"{d}_{side[screen]}": scores[screen][d] for screen in ("left", "right") for d in DIMENSIONS}
            try:
                db.execute(f"INSERT INTO ratings(study, item, annotator, preference, left_is_a, {', '.join(SCORE_COLUMNS)}, "
                           f"seconds, created) VALUES (?, ?, ?, ?, ?, {', '.join('?' * len(SCORE_COLUMNS))}, ?, ?)",
                           (study, item, annotator, side.get(preference, "tie"), row[0],
                            *(values[c] for c in SCORE_COLUMNS), seconds, time.time()))  # fmt: skip
            except sqlite3.IntegrityError:
                raise UiError(409, f"{annotator!r} has already rated item {item}") from None

    def ratings(self, study: str) -> list[dict]:
        """Every rating of a study in model terms, with its item's prompt, answers and gold answer."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT r.*, i.position, i.prompt, i.answer_a, i.answer_b, i.gold FROM ratings r "
                "JOIN items i ON i.id = r.item WHERE r.study = ? ORDER BY r.id", (study,)).fetchall()  # fmt: skip
        return [dict(r) for r in rows]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "study"
