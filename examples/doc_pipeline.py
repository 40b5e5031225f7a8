"""The ``documents`` pipeline: real work on real files, slow enough to watch.

Push a task with data ``{"path": "examples/docs/tides.txt"}`` (optionally ``output_dir``,
default ``reports``, and ``step_delay``, default 0.3 s) and a worker with
``worker.pipelines: [examples.doc_pipeline]`` runs four steps:

``read``
    reads the UTF-8 text file at ``path`` (relative paths: the worker's directory).
``normalise``
    Unicode NFKC, lower case, punctuation and symbols removed, whitespace collapsed.
``statistics``
    words, unique words, the top 10 words, the top 10 keywords (words that are not common
    English stop words), sentences, paragraphs, average word length and reading time (200
    words a minute).
``report``
    writes ``<output_dir>/<file stem>.json`` and returns its path and a summary.

Each step spends ``step_delay`` seconds reporting progress (so ``conveyor task show`` and
the demo have something to show) and stops that wait early when the task is canceled or
the worker is shutting down: the real work is quick, so the task still finishes inside the
worker's drain. Each step's result is checkpointed, so a retry resumes where it failed.

A missing file, a directory, a file that is not UTF-8 or is larger than 1 MiB fails the
task at once (reason ``invalid_data``): retrying cannot fix it. Reports are written
atomically, so a retried ``report`` step never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from conveyor import Pipeline, PipelineError, StepContext

WORDS_PER_MINUTE = 200
TOP_WORDS = 10
#: Step results are stored in the task record, so the text travels there: keep it modest.
MAX_DOCUMENT_BYTES = 1024 * 1024
_TICK = 0.05  # seconds between progress reports and flag checks while a step waits

#: An apostrophe inside a word ("don't", "Mill's") is dropped rather than split on.
_INNER_APOSTROPHE = re.compile(r"(?<=\w)['\u2019](?=\w)")
#: A sentence ends at . ! ? or … (closing quotes/brackets allowed after it) before a space
#: or the end, or at a blank line (headings and salutations count as sentences).
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)|\n[ \t]*\n")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_WORD_CHAR = re.compile(r"\w")
#: Common English words left out of ``top_keywords`` (as are numbers); ``top_words`` counts
#: every word.
_STOP_WORDS_TEXT = """
    a about above after again all also always an and any are as at be because been before being
    below but by can could did do does each even every for from had has have he her here him his
    how i if in into is it its just like many may me might more most much must my never no not
    now of often on once one only or other our out over own same she should so some still such
    than that the their them then there these they this those through to too under until up upon
    very was we were what when where which while who why will with within without would you your
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())


class DocumentTask(BaseModel):
    """The task data: checked before the first step, so bad data fails at once."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="the text file to analyse")
    output_dir: str = Field(default="reports", min_length=1, description="where reports go")
    step_delay: float = Field(
        default=0.3, ge=0, le=30, description="seconds each step spends showing progress"
    )


documents = Pipeline("documents", max_retries=2, retry_backoff=1.0, schema=DocumentTask)


# -- the steps -------------------------------------------------------------------------------


@documents.step(timeout=60)
def read(ctx: StepContext) -> dict[str, Any]:
    """Read the file; the text and its size go to the next steps."""
    task = _task(ctx)
    path = Path(task.path).expanduser()
    text, size = read_document(path)
    _pace(ctx, f"read {path.name}")
    return {
        "path": str(path.resolve()),
        "name": path.name,
        "bytes": size,
        "characters": len(text),
        "lines": len(text.splitlines()),
        "text": text,
    }


@documents.step(timeout=60)
def normalise(ctx: StepContext) -> dict[str, Any]:
    """NFKC, lower case, no punctuation, single spaces."""
    _pace(ctx, "normalising")
    text = normalise_text(ctx.results["read"]["text"])
    return {"text": text, "characters": len(text)}


@documents.step(timeout=60)
def statistics(ctx: StepContext) -> dict[str, Any]:
    """Counts from the normalised text; sentences and paragraphs from the original."""
    _pace(ctx, "counting")
    return compute_statistics(ctx.results["read"]["text"], ctx.results["normalise"]["text"])


@documents.step(timeout=60)
def report(ctx: StepContext) -> dict[str, Any]:
    """Write ``<output_dir>/<stem>.json``; the task's result is its path and a summary."""
    task = _task(ctx)
    source, stats = ctx.results["read"], ctx.results["statistics"]
    _pace(ctx, "writing the report")
    target = Path(task.output_dir).expanduser() / f"{Path(source['name']).stem}.json"
    content = {
        "document": source["name"],
        "source": source["path"],
        "bytes": source["bytes"],
        "characters": source["characters"],
        "lines": source["lines"],
        "statistics": stats,
        "task_id": ctx.task_id,
        "attempt": ctx.attempt,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomically(target, content)
    return {
        "report": str(target.resolve()),
        "document": source["name"],
        "summary": {
            "words": stats["words"],
            "unique_words": stats["unique_words"],
            "sentences": stats["sentences"],
            "average_word_length": stats["average_word_length"],
            "reading_time_seconds": stats["reading_time_seconds"],
            "top_words": [entry["word"] for entry in stats["top_words"][:5]],
            "top_keywords": [entry["word"] for entry in stats["top_keywords"][:5]],
        },
    }


# -- the work, as plain functions (tested directly) ------------------------------------------


def read_document(path: Path) -> tuple[str, int]:
    """The file's text and size in bytes; PipelineError('invalid_data') if it cannot be."""
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise PipelineError(
                "invalid_data", f"{path}: {size} bytes; documents are limited to 1 MiB"
            )
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise PipelineError("invalid_data", f"{path}: no such file") from None
    except IsADirectoryError:
        raise PipelineError("invalid_data", f"{path}: is a directory, not a file") from None
    try:
        return raw.decode("utf-8-sig"), len(raw)
    except UnicodeDecodeError as exc:
        raise PipelineError(
            "invalid_data", f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def normalise_text(text: str) -> str:
    """NFKC, lower case, apostrophes inside words dropped, other punctuation and symbols
    (but not a decimal point or thousands comma) replaced by spaces, runs of whitespace
    collapsed to one space."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _INNER_APOSTROPHE.sub("", text)
    kept = [
        " " if unicodedata.category(char)[0] in "PS" and not _in_number(text, i) else char
        for i, char in enumerate(text)
    ]
    return " ".join("".join(kept).split())


def _in_number(text: str, i: int) -> bool:
    """A point or comma between digits ("3.5", "10,000") is part of the number."""
    return (
        text[i] in ".,"
        and 0 < i < len(text) - 1
        and text[i - 1].isdigit()
        and text[i + 1].isdigit()
    )


def count_sentences(text: str) -> int:
    """Sentences: pieces between . ! ? … (or blank lines) that contain a word character."""
    text = unicodedata.normalize("NFKC", text)
    return sum(1 for piece in _SENTENCE_END.split(text) if _WORD_CHAR.search(piece))


def compute_statistics(original: str, normalised: str) -> dict[str, Any]:
    """Word statistics of ``normalised``; sentences and paragraphs of ``original``."""
    words = normalised.split()
    counts = Counter(words)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    top = ranked[:TOP_WORDS]
    keywords = [(word, n) for word, n in ranked if word not in STOP_WORDS and _has_letter(word)]
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(original) if _WORD_CHAR.search(p)]
    average = round(sum(len(word) for word in words) / len(words), 2) if words else 0.0
    return {
        "words": len(words),
        "unique_words": len(counts),
        "top_words": [{"word": word, "count": count} for word, count in top],
        "top_keywords": [{"word": word, "count": n} for word, n in keywords[:TOP_WORDS]],
        "sentences": count_sentences(original),
        "paragraphs": len(paragraphs),
        "average_word_length": average,
        "reading_time_seconds": round(len(words) * 60 / WORDS_PER_MINUTE),
    }


def _has_letter(word: str) -> bool:
    return any(char.isalpha() for char in word)


def write_json_atomically(target: Path, content: Any) -> None:
    """Write to a temporary file beside ``target`` and rename it over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(
            json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


# -- helpers ---------------------------------------------------------------------------------


def _task(ctx: StepContext) -> DocumentTask:
    return DocumentTask.model_validate(ctx.data)


def _pace(ctx: StepContext, note: str) -> None:
    """Spend ``step_delay`` seconds reporting this step's share of the task's progress.

    Returns early once the task is canceled (the worker stops before the next step) or
    the worker is shutting down (the step's real work is quick, so it finishes in time).
    """
    delay = _task(ctx).step_delay
    names = [step.name for step in documents.steps]
    index, total = names.index(ctx.step), len(names)
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        share = min(elapsed / delay, 1.0) if delay > 0 else 1.0
        ctx.progress((index + share) / total, f"{ctx.step}: {note}")
        if share >= 1.0 or ctx.cancelled or ctx.shutting_down:
            return
        time.sleep(min(_TICK, delay - elapsed))
